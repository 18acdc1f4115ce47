"""Where exod keeps its state and its socket unless told otherwise.

Apart from exod/config.py (the whole settings table, which takes milliseconds to import) so that
exoctl finds the socket without paying for it: every exoctl command starts by importing this.
exod/config.py must make the same choice (tests/unit/test_home.py checks that both agree).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

# Linux allows 108 bytes in sun_path including the NUL, macOS 104; take the smaller everywhere.
MAX_SOCKET_PATH = 103


def default_home(environ: Mapping[str, str], platform: str = sys.platform) -> Path:
    """The platform's state dir for exod (DESIGN.md: Data)."""
    home = Path(environ.get("HOME") or Path.home())
    if platform == "darwin":
        return home / "Library" / "Application Support" / "exod"
    state = environ.get("XDG_STATE_HOME")
    base = Path(state) if state else home / ".local" / "state"
    return base / "exod"
