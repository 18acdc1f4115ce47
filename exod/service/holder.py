"""Which exod holds a home, and whether the service started it.

exod holds an exclusive flock on `HOME/exod.lock` for as long as it lives, with its pid inside
(exod/daemon.py, hold_home). A second exod on the same home exits 75; a service installed over a
home that an exod started by hand holds would do just that at every restart. So `exoctl service`
looks first.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path

from exod.service.paths import LAUNCHER, UNIT

LOCK_NAME = "exod.lock"  # daemon.hold_home's


@dataclass(frozen=True)
class Holder:
    pid: int | None  # None in the instant between taking the lock and writing the pid
    by_service: bool  # started by the service manager, not by hand


def holder(home: Path) -> Holder | None:
    """The exod that holds `home`, or None when none does. Creates nothing, changes nothing."""
    try:
        lock = (home / LOCK_NAME).open()  # read-only: a probe must not create the file
    except OSError:
        return None  # no lock file (no exod ever ran there), or not ours to read
    with lock:
        try:
            # A shared lock, given back at once; exod's exclusive one makes it fail. (An exod
            # starting in that same microsecond would exit 75 and be restarted by its manager.)
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = lock.read().strip()
            pid = int(text) if text.isdigit() else None
            return Holder(pid, pid is not None and started_by_service(pid))
        fcntl.flock(lock, fcntl.LOCK_UN)
        return None


def in_unit_cgroup(proc_cgroup: str) -> bool:
    """Whether /proc/PID/cgroup text puts the process in exod.service's cgroup (or below it)."""
    return any(UNIT in line.split(":", 2)[-1].split("/") for line in proc_cgroup.splitlines())


def is_launcher(cmdline: list[str]) -> bool:
    """Whether a command line is exod.app's launcher (`/bin/sh .../exod-launcher`)."""
    return any(Path(arg).name == LAUNCHER for arg in cmdline[:2])


def started_by_service(pid: int) -> bool:
    """Whether exod `pid` runs as the service: inside exod.service's cgroup (systemd), or as the
    child of exod.app's launcher (launchd). Read from the process itself, so that it holds even
    where the service manager does not answer."""
    try:
        if in_unit_cgroup(Path(f"/proc/{pid}/cgroup").read_text()):
            return True
    except OSError:
        pass  # no /proc (macOS), or the process is gone
    import psutil  # only here: every exoctl command imports this module

    try:
        parent = psutil.Process(pid).parent()
        return parent is not None and is_launcher(parent.cmdline())
    except psutil.Error:
        return False
