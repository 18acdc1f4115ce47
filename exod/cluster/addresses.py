"""Which addresses an invite names for the inviter (pure; psutil is read by the caller)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from exod.errors import ExoError

# At most this many addresses in one token: each makes it longer for a person to copy.
MAX_ADDRESSES = 4


def invite_addresses(bind: str, machine: Iterable[str]) -> tuple[str, ...]:
    """The addresses a joiner may reach the join port at: `bind` itself unless it is the
    wildcard, else this machine's non-loopback IPv4 addresses (`machine`: every address of every
    interface, as psutil lists them) in order, without duplicates or link-local ones."""
    address = ipaddress.ip_address(bind)
    if not address.is_unspecified:
        return (str(address),)
    found: list[str] = []
    for text in machine:
        try:
            candidate = ipaddress.ip_address(text)
        except ValueError:
            continue  # a MAC address, or an IPv6 address with a zone (fe80::1%en0)
        usable = (
            isinstance(candidate, ipaddress.IPv4Address)
            and not candidate.is_loopback
            and not candidate.is_link_local
            and not candidate.is_unspecified
        )
        if usable and str(candidate) not in found:
            found.append(str(candidate))
    if not found:
        raise ExoError(
            "peer_unreachable",
            "this machine has no IPv4 address other than loopback, so no other machine could "
            "reach it with an invite: connect it to the network, or set EXOD_PEER_BIND to the "
            "address to be reached at",
        )
    return tuple(found[:MAX_ADDRESSES])
