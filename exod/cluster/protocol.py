"""The peer protocol's version, and the one check every peer call makes of it (pure)."""

from __future__ import annotations

from exod.errors import ExoError

# MAJOR.MINOR: a peer of another MAJOR is refused; MINOR only adds fields old peers ignore.
PROTOCOL_VERSION = "1.1"


def major(version: str) -> str:
    return version.split(".", 1)[0]


def check_version(theirs: str, who: str) -> None:
    """Refuse a peer (`who`, in words) that speaks another major version than this exod."""
    if major(theirs) != major(PROTOCOL_VERSION):
        shown = theirs[:20] if theirs.isprintable() else repr(theirs[:20])
        raise ExoError(
            "protocol_mismatch",
            f"{who} speaks peer protocol {shown or 'none'}, this exod speaks {PROTOCOL_VERSION}: "
            "upgrade the older exod so both run the same release",
        )
