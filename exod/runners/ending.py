"""A runner's end: when its leader exits, exactly one RunnerFailed or RunnerStopped event, and
each run it still owed, running in its batch or waiting in its queue, fails with that error (each
gets its own RunFinished from exod.runs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from exod.config import Settings
from exod.errors import ExoError
from exod.journal import Journal
from exod.proto.exo.v1 import events_pb2
from exod.runners import process
from exod.runners.cgroup import MemoryCgroups
from exod.runners.handle import Runner, record

log = logging.getLogger(__name__)

# Lines of a runner's log quoted in a crash's detail.
LOG_TAIL_LINES = 12
# Reasons a runner is ended for that are its failures (RunnerFailed), not requests (RunnerStopped).
FAILURES = frozenset({"load_stall", "load_timeout", "decode_stall", "memory_limit", "crashed"})


async def await_end(
    runner: Runner, settings: Settings, cgroups: MemoryCgroups, journal: Journal
) -> None:
    """Wait for the runner's leader to exit, then close everything of it and log its end."""
    status = await runner.proc.wait()
    # The leader is gone; whatever it started must not outlive it.
    survivors = await asyncio.to_thread(process.kill_group_now, runner.pid)
    if survivors:
        log.error("runner %s left processes that survived SIGKILL: %s", runner.id, survivors)
    # Let the reader drain what the runner said before it died (its last error, say).
    reader = runner.tasks[0]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(reader), 2.0)
    for task in runner.tasks:
        if task is not asyncio.current_task():
            task.cancel()
    runner.writer.close()
    os.close(runner.lifeline)
    if cgroups.oom_killed(runner.cgroup) and runner.ending is None:
        runner.ending = "memory_limit"
        runner.ending_detail = (
            "the kernel ended it at the cap of "
            f"{settings.max_runner_memory >> 20} MiB (EXOD_MAX_RUNNER_MEMORY, memory.max)"
        )
    cgroups.remove(runner.cgroup)
    failure = record_end(runner, status, journal)
    owed = [*runner.active.values(), *runner.queue]
    runner.active.clear()
    runner.queue.clear()
    for job in owed:
        job.finish(failure)


def record_end(runner: Runner, status: int, journal: Journal) -> ExoError:
    """Log how the runner ended and return the error its unfinished jobs get."""
    if runner.ending is not None and runner.ending not in FAILURES:
        reason = runner.ending
        stopped = events_pb2.RunnerStopped(runner_id=runner.id, reason=reason)
        record(journal, runner, events_pb2.Event(runner_stopped=stopped))
        return ExoError(reason, _stop_message(runner, reason))
    exit_status, sig = (0, -status) if status < 0 else (status, 0)
    if runner.load_error is not None:
        err = runner.load_error
    elif runner.ending is not None and runner.ending != "crashed":
        err = ExoError(runner.ending, f"runner {runner.id} was ended: {runner.ending_detail}")
    else:
        how = f"was killed by {signal.Signals(sig).name}" if sig else f"exited {exit_status}"
        err = ExoError(
            "crashed",
            f"runner {runner.id} {how}; its log is {runner.log_path}. "
            f"Last lines: {_tail(runner.log_path)}",
        )
    failed = events_pb2.RunnerFailed(
        runner_id=runner.id,
        reason=err.reason,
        detail=err.message,
        exit_status=exit_status,
        signal=sig,
    )
    record(journal, runner, events_pb2.Event(runner_failed=failed))
    return err


def _stop_message(runner: Runner, reason: str) -> str:
    if reason == "killed":
        return f"runner {runner.id} was killed (exoctl kill) during this run"
    if reason == "daemon_stopped":
        return "exod is shutting down"
    if runner.ending_detail:  # one rank of a split model, ended with its instance
        return runner.ending_detail
    return f"runner {runner.id} was stopped ({reason})"


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    tail = [line for line in lines if line.strip()][-LOG_TAIL_LINES:]
    return " | ".join(tail) if tail else "(the log is empty)"
