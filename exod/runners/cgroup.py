"""A hard memory limit from the kernel, where a delegated cgroup v2 offers one (Linux).

Sampling USS twice a second can miss an allocation that is fast enough; `memory.max` cannot. When
exod runs in a cgroup v2 it may write to (a systemd user unit with `Delegate=yes`, or a shell in
a delegated slice), it moves itself into a leaf `exod` child (cgroup v2 forbids processes in a
cgroup that hands controllers to its children), enables the memory controller for its children,
and puts each runner's whole group into a child `runner-<id>` with `memory.max` set to the cap.

Everything here is best effort and fails safe: without a delegated cgroup v2 (macOS, cgroup v1,
a container) or on any error, exod logs why once and relies on sampling alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")


def own_cgroup(proc_cgroup: str) -> str | None:
    """The cgroup v2 path from /proc/self/cgroup text, or None on a v1 or hybrid-only system."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
    return None


class MemoryCgroups:
    """Runner cgroups under exod's own delegated cgroup; inert when there is none."""

    def __init__(self, base: Path | None) -> None:
        self.base = base

    @classmethod
    def setup(
        cls, root: Path = ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
    ) -> MemoryCgroups:
        try:
            path = own_cgroup(proc_cgroup.read_text())
            if path is None or not (root / "cgroup.controllers").exists():
                log.info("no cgroup v2 here: the runner memory cap is enforced by sampling only")
                return cls(None)
            if path == "/":
                # The root cgroup is the whole machine's, never delegated to one service.
                log.info("exod runs in the root cgroup: sampling only")
                return cls(None)
            base = root / path.lstrip("/")
            if "memory" not in (base / "cgroup.controllers").read_text().split():
                log.info("cgroup %s has no memory controller: sampling only", base)
                return cls(None)
            if not os.access(base / "cgroup.subtree_control", os.W_OK):
                log.info("cgroup %s is not delegated to exod: sampling only", base)
                return cls(None)
            leaf = base / "exod"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(f"{os.getpid()}\n")
            (base / "cgroup.subtree_control").write_text("+memory\n")
        except OSError as e:
            log.info("cannot use cgroup v2 for a hard memory limit (%s): sampling only", e)
            return cls(None)
        log.info("runners get a hard memory limit (memory.max) under %s", base)
        return cls(base)

    def limit(self, runner_id: str, pids: Iterable[int], max_bytes: int) -> Path | None:
        """Put these processes in a cgroup of their own capped at `max_bytes`."""
        if self.base is None:
            return None
        group = self.base / f"runner-{runner_id}"
        try:
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(f"{max_bytes}\n")
            for pid in pids:
                (group / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as e:
            log.warning("runner %s runs without a hard memory limit: %s", runner_id, e)
            return None
        return group

    @staticmethod
    def oom_killed(group: Path | None) -> bool:
        """Whether the kernel killed a process of this cgroup for going over memory.max."""
        if group is None:
            return False
        try:
            events = (group / "memory.events").read_text().split("\n")
        except OSError:
            return False
        counts = dict(line.split(" ", 1) for line in events if " " in line)
        return int(counts.get("oom_kill", "0")) > 0

    def remove(self, group: Path | None) -> None:
        """Remove a runner's cgroup once its processes are gone."""
        if group is None:
            return
        try:
            group.rmdir()
        except OSError as e:
            log.warning("could not remove %s: %s", group, e)
