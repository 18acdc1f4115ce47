"""Every rank of a split model runs the same exod, MLX and mlx-lm: the ranks step one batch
together and exchange MLX arrays, so what one version computes must be what the others expect.
The coordinator sends its versions with each rank; a member of other versions refuses its rank,
naming which differ."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping

from exod import __version__

PACKAGES = ("mlx", "mlx-lm")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def ours() -> dict[str, str]:
    """This node's versions, read from the installed packages (MLX is not imported)."""
    return {"exod": __version__, **{p: _version(p) for p in PACKAGES}}


def mismatch(coordinator: Mapping[str, str], here: Mapping[str, str]) -> str | None:
    """Which versions differ, in words (None: the same). A coordinator that sent none (an
    earlier exod) is not checked."""
    if not coordinator:
        return None
    differ = [
        f"{name} {coordinator.get(name, 'unknown')} there, {version} here"
        for name, version in sorted(here.items())
        if coordinator.get(name) != version
    ]
    return "; ".join(differ) if differ else None
