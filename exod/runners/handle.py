"""A runner as the supervisor holds it (its process, pipe, jobs, and what it last said), and
spawning one.

Each runner is `python -m exod.runners.runner` under the shim, in its own process group, talking
protobuf frames over a socket pair whose other end is its lifeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from exod import RUNNER_PROTOCOL_VERSION
from exod.config import Settings
from exod.errors import ExoError
from exod.eventlog import StoreError
from exod.journal import Journal
from exod.models.inspect import content_hash
from exod.proto.exo.v1 import events_pb2, runner_pb2
from exod.runners import pipe, process
from exod.runners.cgroup import MemoryCgroups
from exod.runners.command import runner_command, runner_env

log = logging.getLogger(__name__)

# What a job's consumer receives, in order: load/prefill progress, text, then Done or an error.
JobItem = runner_pb2.LoadProgress | runner_pb2.Tokens | runner_pb2.Done | ExoError


@dataclass(eq=False)
class Job:
    """One generation, queued on a runner or running in it."""

    run_id: str
    request: runner_pb2.Generate
    out: asyncio.Queue[JobItem] = field(default_factory=asyncio.Queue)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    # The KV cache it may grow to (admission.reservation), held while it runs.
    reservation: int = 0
    # --force: admission's estimates do not refuse it (the memory cap still ends its runner).
    force: bool = False
    decoding: bool = False  # it has produced a token: its prefill is over

    def finish(self, item: runner_pb2.Done | ExoError) -> None:
        if not self.finished.is_set():
            self.out.put_nowait(item)
            self.finished.set()


@dataclass(eq=False)
class Runner:
    id: str
    model: str
    model_path: str
    proc: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    log_path: Path
    state: str = "loading"  # loading, ready (nothing running), running, stopping
    queue: deque[Job] = field(default_factory=deque)  # waiting, in order
    active: dict[str, Job] = field(default_factory=dict)  # sent to the runner, by request id
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ending: str | None = None  # the reason we were asked to end it
    ending_detail: str = ""
    load_error: ExoError | None = None
    last_used: float = field(default_factory=time.monotonic)  # ready, or its last job's end
    spawned_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    last_progress: float = field(default_factory=time.monotonic)  # any request's progress
    memory: int | None = None  # the tree's USS at the last sample
    # Its USS with nothing running (the smallest sample so far); until sampled, the estimate
    # admission made before spawning it (None: --force skipped it).
    idle_memory: int | None = None
    estimate: int | None = None
    # KV bytes per token: from config.json at spawn, from the loaded model once Ready says.
    kv_bytes_per_token: int = 0
    hello: runner_pb2.HelloReply | None = None
    heartbeat: runner_pb2.Heartbeat | None = None  # the latest: its batch and prompt cache
    lifeline: int = -1  # our write end; closing it (or dying) tells the shim to end the group
    cgroup: Path | None = None  # its cgroup v2 with memory.max, where the kernel offers one
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Set: one rank of a split model (exod/cluster/instances.py). A rank other than 0 takes no
    # jobs and is never idle here: its lease from the coordinator decides when it ends.
    rank: runner_pb2.Rank | None = None
    instance: str = ""  # the instance (i-…) it is rank 0 of, on the coordinator
    content_hash: str = ""  # of model_path (RunnerSpawned): members find the same model by it

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def decoding(self) -> bool:
        """Some generation it runs has produced a token (the decode stall limit applies)."""
        return any(job.decoding for job in self.active.values())

    @property
    def model_memory(self) -> int:
        """What the runner takes with nothing running, as well as it is known."""
        if self.idle_memory is not None:
            return self.idle_memory
        return self.estimate or 0

    @property
    def reserved(self) -> int:
        return sum(job.reservation for job in self.active.values())

    def send_soon(self, msg: runner_pb2.ToRunner) -> None:
        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                await pipe.write_message(self.writer, msg)

        self.tasks.append(asyncio.create_task(send()))


def record(journal: Journal, runner: Runner, event: events_pb2.Event) -> None:
    """Log a fact about a live runner; a full disk must not stop us from ending it.

    A runner whose end is missing from the log is closed as interrupted at the next start.
    """
    try:
        journal.append(event)
    except StoreError:
        log.exception("runner %s: %s not logged", runner.id, event.WhichOneof("kind"))


async def spawn(
    settings: Settings,
    journal: Journal,
    cgroups: MemoryCgroups,
    model: str,
    model_path: str,
) -> Runner:
    """Start a runner in its own group and log RunnerSpawned; the caller starts its tasks and
    sends Hello and Load (see load_message). Raises ExoError, or StoreError when the spawn
    cannot be logged (the runner is ended again then)."""
    runner_id = "r-" + secrets.token_hex(4)
    logs = settings.home / "runners"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{runner_id}.log"
    ours, theirs = socket.socketpair()
    # A local append-only file opens at once; no need to leave the loop for it.
    with open(log_path, "ab") as log_file, ours, theirs:  # noqa: ASYNC230
        proc, lifeline_write = await process.spawn_group(
            lambda lifeline: runner_command(
                lifeline, theirs.fileno(), os.getpid(), settings.runner_wrapper
            ),
            what="a runner",
            env=runner_env(os.environ, settings.home, runner_id),
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=(theirs.fileno(),),
        )
        reader, writer = await asyncio.open_unix_connection(sock=ours.dup())
    runner = Runner(runner_id, model, model_path, proc, reader, writer, log_path)
    runner.lifeline = lifeline_write
    runner.content_hash = await asyncio.to_thread(_content_hash, model_path)
    if cgroups.base is not None:
        members = [proc.pid, *process.group_members(proc.pid)]
        runner.cgroup = cgroups.limit(runner_id, members, settings.max_runner_memory)
    spawned = events_pb2.RunnerSpawned(
        runner_id=runner_id,
        model=model,
        model_path=model_path,
        pid=proc.pid,
        start_time=process.start_time_of(proc.pid),
        log_path=str(log_path),
        content_hash=runner.content_hash,
    )
    try:
        journal.append(events_pb2.Event(runner_spawned=spawned))
    except StoreError:
        # A runner the log does not know of could never be closed at restart: end it now.
        await asyncio.to_thread(process.kill_group_now, proc.pid)
        await proc.wait()
        writer.close()
        os.close(lifeline_write)
        raise
    log.info("spawned runner %s pid %d for %s", runner_id, proc.pid, model)
    return runner


def greeting(
    settings: Settings, model_path: str, rank: runner_pb2.Rank | None = None
) -> list[runner_pb2.ToRunner]:
    """Hello, then Load with the batch size and the caches' bounds (and the rank, for one rank
    of a split model)."""
    hello = runner_pb2.Hello(protocol_version=RUNNER_PROTOCOL_VERSION)
    load = runner_pb2.Load(
        model_path=model_path,
        parallel=settings.parallel,
        prompt_cache_bytes=settings.prompt_cache_bytes,
        mlx_cache_limit=settings.mlx_cache_limit,
        stream_interval_s=settings.stream_interval,
    )
    if rank is not None:
        load.rank.CopyFrom(rank)
    return [runner_pb2.ToRunner(hello=hello), runner_pb2.ToRunner(load=load)]


def _content_hash(model_path: str) -> str:
    """The model's content hash; "" when its files cannot be read (its load will say why)."""
    try:
        return content_hash(Path(model_path))
    except (ExoError, OSError, ValueError):
        return ""
