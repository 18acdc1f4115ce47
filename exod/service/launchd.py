"""The macOS side, rendered (pure): the LaunchAgent plist and the files of exod.app.

The bundle exists for one reason: macOS lets a process use the local network (mDNS included)
only when its responsible code carries NSLocalNetworkUsageDescription and NSBonjourServices in an
Info.plist. So launchd starts the bundle's launcher, which stays exod's parent (see
exod-launcher.sh for why it does not exec), and the agent names the bundle in
AssociatedBundleIdentifiers so that Login Items shows the job as exod.
"""

from __future__ import annotations

import plistlib
from collections.abc import Mapping
from importlib import resources
from typing import Any

from exod.service.paths import LABEL, LAUNCHER

SERVICE_TYPE = "_exod._tcp"  # the mDNS service type peers announce and browse (DESIGN.md)
NETWORK_USAGE = (
    "exod finds the other machines of your exod cluster on the local network, so that a model "
    "too large for one machine can be split across several."
)
# launchd restarts an exod that exits unsuccessfully at most this often (seconds).
THROTTLE_INTERVAL_S = 10
# How long launchd waits after SIGTERM before SIGKILL: exod ends its runners first.
EXIT_TIMEOUT_S = 30
# The directories launchd's own default PATH holds; exod's own goes first.
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

Plist = dict[str, Any]


def info_plist(version: str) -> Plist:
    """Contents/Info.plist of exod.app."""
    return {
        "CFBundleIdentifier": LABEL,
        "CFBundleName": "exod",
        "CFBundleDisplayName": "exod",
        "CFBundleExecutable": LAUNCHER,
        "CFBundlePackageType": "APPL",
        "CFBundleInfoDictionaryVersion": "6.0",
        "CFBundleShortVersionString": version,
        "CFBundleVersion": version,
        "LSMinimumSystemVersion": "12.0",
        # An agent: no Dock icon, no menu bar.
        "LSUIElement": True,
        "NSLocalNetworkUsageDescription": NETWORK_USAGE,
        "NSBonjourServices": [SERVICE_TYPE],
    }


def launcher_script() -> str:
    """Contents/MacOS/exod-launcher: the POSIX shell script that launchd starts."""
    return resources.files("exod.service").joinpath("exod-launcher.sh").read_text()


def bundle_files(version: str) -> dict[str, tuple[bytes, int]]:
    """Each file of exod.app, by its path inside the bundle: (content, mode)."""
    return {
        "Contents/Info.plist": (plistlib.dumps(info_plist(version)), 0o644),
        f"Contents/MacOS/{LAUNCHER}": (launcher_script().encode(), 0o755),
    }


def agent_plist(launcher: str, log: str, environment: Mapping[str, str]) -> Plist:
    """The LaunchAgent: start the bundle's launcher at login, restart it when it fails."""
    return {
        "Label": LABEL,
        "ProgramArguments": [launcher],
        "RunAtLoad": True,
        # Restart after a crash or a failure, not after a clean stop.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_INTERVAL_S,
        "ExitTimeOut": EXIT_TIMEOUT_S,
        # Interactive: launchd applies no resource throttling, unlike Background (and, under
        # pressure, Standard). exod is what the user waits for while a model generates.
        "ProcessType": "Interactive",
        # Only in a logged-in GUI session, where the Local Network permission can be asked for.
        "LimitLoadToSessionType": "Aqua",
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "EnvironmentVariables": dict(environment),
        "AssociatedBundleIdentifiers": [LABEL],
    }


def dumps(plist: Plist) -> bytes:
    return plistlib.dumps(plist, sort_keys=False)
