"""Where the service's files go on each platform, and what it is called (pure: from the
environment given, never from the process's own)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Platform = Literal["macos", "linux"]
PLATFORMS: tuple[Platform, ...] = ("macos", "linux")

# The launchd label and the bundle identifier: one name, so that macOS's Login Items and Local
# Network settings show the job under the app that carries the keys.
LABEL = "org.exod.daemon"
UNIT = "exod.service"
LAUNCHER = "exod-launcher"


def this_platform(platform: str = sys.platform) -> Platform:
    return "macos" if platform == "darwin" else "linux"


def user_home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    return Path(home) if home else Path.home()


@dataclass(frozen=True)
class MacPaths:
    agent: Path  # the LaunchAgent plist
    bundle: Path  # exod.app, whose Info.plist carries the Local Network keys
    log: Path  # exod's stdout and stderr, as launchd writes them

    @property
    def launcher(self) -> Path:
        return self.bundle / "Contents" / "MacOS" / LAUNCHER

    @classmethod
    def of(cls, environ: Mapping[str, str]) -> MacPaths:
        home = user_home(environ)
        return cls(
            agent=home / "Library" / "LaunchAgents" / f"{LABEL}.plist",
            # ~/Applications: the per-user place for apps, where people look for what runs.
            bundle=home / "Applications" / "exod.app",
            log=home / "Library" / "Logs" / "exod" / "exod.log",
        )


@dataclass(frozen=True)
class LinuxPaths:
    unit: Path

    @classmethod
    def of(cls, environ: Mapping[str, str]) -> LinuxPaths:
        # The first directory of the user's unit search path meant for the user's own units
        # (systemd.unit(5)): $XDG_CONFIG_HOME/systemd/user, by default ~/.config/systemd/user.
        config = environ.get("XDG_CONFIG_HOME") or str(user_home(environ) / ".config")
        return cls(unit=Path(config) / "systemd" / "user" / UNIT)
