"""Thin adapter over OS processes: start a group under its lifeline, end a process group and
prove nothing of it survives.

Every runner leads its own process group (it is started with start_new_session), so the group id
is the runner's pid and one signal reaches everything the runner started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

import psutil

from exod.errors import ExoError


async def spawn_group(
    command: Callable[[int], Sequence[str]],
    *,
    what: str,
    env: Mapping[str, str],
    stdout: int | IO[bytes],
    stderr: int,
    pass_fds: Sequence[int] = (),
) -> tuple[asyncio.subprocess.Process, int]:
    """Start `command(lifeline_fd)` (a shim command line) as the leader of a new process group,
    with the read end of a fresh lifeline pipe. Returns the process and the lifeline's write
    end, which only exod holds: closing it, or exod dying, makes the shim end the group.
    """
    lifeline_read, lifeline_write = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *command(lifeline_read),
            pass_fds=(*pass_fds, lifeline_read),
            start_new_session=True,  # its own process group: one signal ends all of it
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    except OSError as e:
        os.close(lifeline_write)
        raise ExoError("internal", f"cannot start {what}: {e}") from e
    finally:
        os.close(lifeline_read)
    return proc, lifeline_write


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def end_group(pgid: int, grace: float, *, poll: float = 0.05) -> list[int]:
    """SIGTERM the group, wait up to `grace`, SIGKILL, then wait until no member is left.

    Returns the pids that survived even SIGKILL for two seconds (an unkillable process in
    uninterruptible sleep); normally empty.
    """
    signal_group(pgid, signal.SIGTERM)
    # A stopped process (SIGSTOP, a debugger) cannot act on SIGTERM until it runs again.
    signal_group(pgid, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not await asyncio.to_thread(group_members, pgid):
            return []
        await asyncio.sleep(poll)
    return await asyncio.to_thread(kill_group_now, pgid)


def kill_group_now(pgid: int) -> list[int]:
    """SIGKILL a group and wait (up to two seconds) until none of it is left; returns survivors."""
    deadline = time.monotonic() + 2.0
    while True:
        signal_group(pgid, signal.SIGKILL)
        survivors = group_members(pgid)
        if not survivors or time.monotonic() > deadline:
            return survivors
        time.sleep(0.05)


def same_process(pid: int, start_time: float) -> bool:
    """Whether `pid` is still the process that started at `start_time` (pids get reused)."""
    try:
        return abs(psutil.Process(pid).create_time() - start_time) < 0.5
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def start_time_of(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return 0.0


def tree_memory(pid: int) -> int:
    """Unique memory (USS) of a process and all its descendants, in bytes; 0 when gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total
