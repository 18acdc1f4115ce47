"""The service files as templates for packagers: what launchd/ and packaging/systemd/ hold.

They are rendered by the same code as `exoctl service install` uses, with @NAME@ placeholders
where install time fills in absolute paths, so that a package build (packaging/macos/build-app,
a distribution's unit) and exoctl cannot drift apart. tools/gen_service_files.py writes them;
a unit test fails when they are stale.
"""

from __future__ import annotations

from exod.service import launchd, systemd
from exod.service.paths import LABEL, LAUNCHER

# Filled in by packaging/macos/build-app (or a packager's own sed).
APP = "@APP@"  # the absolute path of exod.app
LOG = "@LOG@"  # exod's log file
BINDIR = "@BINDIR@"  # the directory that holds the exod executable
VERSION = "@VERSION@"  # exod's version


def files() -> dict[str, tuple[bytes, int]]:
    """Each template by its path in the repository: (content, mode)."""
    agent = launchd.agent_plist(
        f"{APP}/Contents/MacOS/{LAUNCHER}",
        LOG,
        {"PATH": f"{BINDIR}:{launchd.SYSTEM_PATH}"},
    )
    bundle = {
        f"launchd/exod.app/{name}": item for name, item in launchd.bundle_files(VERSION).items()
    }
    unit = systemd.unit([f"{BINDIR}/exod"], {})
    return {
        f"launchd/{LABEL}.plist": (launchd.dumps(agent), 0o644),
        **bundle,
        "packaging/systemd/exod.service": (unit.encode(), 0o644),
    }
