"""The supervisor: spawns runner subprocesses, feeds them one generation at a time, ends them.

Each runner is `python -m exod.runners.runner` in its own process group, talking protobuf frames
over a socket pair whose other end is its lifeline. Three tasks watch each runner: a reader that
routes its messages, a worker that hands it queued jobs one by one, and a watcher that turns its
exit into exactly one RunnerFailed or RunnerStopped event and fails whatever it still owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from exod import RUNNER_PROTOCOL_VERSION
from exod.config import Settings
from exod.errors import ExoError
from exod.eventlog import StoreError
from exod.journal import Journal
from exod.proto.exo.v1 import events_pb2, runner_pb2
from exod.runners import admission, pipe, process
from exod.runners.cgroup import MemoryCgroups
from exod.runners.command import runner_command, runner_env
from exod.runners.limits import Limits, Watch, verdict

log = logging.getLogger(__name__)

# What a job's consumer receives, in order: load/prefill progress, text, then Done or an error.
JobItem = runner_pb2.LoadProgress | runner_pb2.Tokens | runner_pb2.Done | ExoError

# Lines of a runner's log quoted in a crash's detail.
LOG_TAIL_LINES = 12
# Measuring a tree's USS reads /proc/*/smaps: cheap, but not worth doing five times a second.
MEMORY_SAMPLE_PERIOD = 0.5
# Messages that prove a runner is moving. Heartbeats do not: a runner wedged inside C++ can still
# run its heartbeat thread.
PROGRESS = frozenset({"hello", "progress", "ready", "tokens", "done", "error"})
# Reasons a runner is ended for that are its failures (RunnerFailed), not requests (RunnerStopped).
FAILURES = frozenset({"load_stall", "load_timeout", "decode_stall", "memory_limit", "crashed"})


@dataclass(eq=False)
class Job:
    """One generation, queued on a runner or running in it."""

    run_id: str
    request: runner_pb2.Generate
    out: asyncio.Queue[JobItem] = field(default_factory=asyncio.Queue)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

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
    state: str = "loading"  # loading, ready, running, stopping
    queue: deque[Job] = field(default_factory=deque)
    current: Job | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ending: str | None = None  # the reason we were asked to end it
    ending_detail: str = ""
    load_error: ExoError | None = None
    last_used: float = field(default_factory=time.monotonic)
    spawned_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    last_progress: float = field(default_factory=time.monotonic)
    decoding: bool = False  # the current generation has produced a token
    memory: int | None = None  # the tree's USS at the last sample
    lifeline: int = -1  # our write end; closing it (or dying) tells the shim to end the group
    cgroup: Path | None = None  # its cgroup v2 with memory.max, where the kernel offers one
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Supervisor:
    def __init__(
        self, journal: Journal, settings: Settings, cgroups: MemoryCgroups | None = None
    ) -> None:
        self._journal = journal
        self._settings = settings
        self._cgroups = cgroups or MemoryCgroups(None)
        self.runners: dict[str, Runner] = {}
        self._logs = settings.home / "runners"
        # Held from looking for a model's runner until a new one is registered: without it, runs
        # that arrive together for a model not loaded yet would each spawn a runner of their own.
        self._spawning = asyncio.Lock()

    # --- requests -------------------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        model_path: str,
        run_id: str,
        request: runner_pb2.Generate,
        accept: Callable[[str, int], None],
        *,
        need: int | None = None,
    ) -> Job:
        """Queue a generation on the model's runner, spawning one when none is alive.

        `need` is the memory a new runner is estimated to take (None: skip the estimate, as
        --force asks; the cap is enforced all the same). `accept(runner_id, queue_position)`
        runs after admission and before the job can start, so the run is in the log before any
        token of it exists.
        """
        async with self._spawning:
            runner = self._live_for(model_path)
            if runner is None:
                if need is not None:
                    await self._make_room(need)
                # Shielded: a client that leaves mid-spawn must not strand a started process
                # that is not yet registered; the runner lives on and idles out if unused.
                runner = await asyncio.shield(self._spawn(model, model_path))
        if len(runner.queue) >= self._settings.queue_depth:
            raise ExoError(
                "queue_full",
                f"{len(runner.queue)} runs are already waiting for runner {runner.id} "
                f"(EXOD_QUEUE_DEPTH={self._settings.queue_depth}); retry later",
            )
        busy = runner.current is not None or runner.state != "ready"
        accept(runner.id, len(runner.queue) + (1 if busy else 0))
        job = Job(run_id=run_id, request=request)
        runner.queue.append(job)
        runner.wake.set()
        return job

    async def _make_room(self, need: int) -> None:
        """Refuse a runner that cannot fit, or evict idle runners (LRU) until it does."""
        vm = await asyncio.to_thread(psutil.virtual_memory)
        memory = admission.Memory(
            cap=self._settings.max_runner_memory,
            total=vm.total,
            available=vm.available,
            reserved=self._settings.reserved_memory,
        )
        idle = [
            admission.Idle(r.id, r.memory or 0, r.last_used)
            for r in self.runners.values()
            if r.ending is None and r.state == "ready" and r.current is None and not r.queue
        ]
        for runner_id in admission.plan(need, memory, idle):
            await self.stop(self.runners[runner_id], "evicted")

    def cancel(self, job: Job) -> None:
        """Stop a job wherever it is: drop it from its queue, or tell its runner to stop."""
        if job.finished.is_set():
            return
        for runner in self.runners.values():
            if job in runner.queue:
                runner.queue.remove(job)
                job.finish(ExoError("cancelled", "cancelled while waiting"))
                return
            if runner.current is job:
                cancel = runner_pb2.ToRunner(cancel=runner_pb2.Cancel(request_id=job.run_id))
                self._send_soon(runner, cancel)
                return

    async def kill(self, runner_id: str) -> None:
        runner = self.runners.get(runner_id)
        if runner is None:
            raise ExoError("runner_not_found", f"no runner {runner_id} is running")
        await self.stop(runner, "killed")

    async def stop(self, runner: Runner, reason: str) -> None:
        """End a runner's whole process group and return once its end is in the log."""
        self.stop_soon(runner, reason)
        await runner.ended.wait()

    def stop_soon(self, runner: Runner, reason: str, detail: str = "") -> None:
        """Mark a runner as ending now (no new job is queued on it) and end it in the background.

        The first reason wins: a runner already being stopped keeps the reason it had.
        """
        if runner.ending is not None:
            return
        runner.ending = reason
        runner.ending_detail = detail
        runner.state = "stopping"
        log.info("stopping runner %s (%s)", runner.id, reason)
        runner.tasks.append(asyncio.create_task(self._end_group(runner)))

    async def _end_group(self, runner: Runner) -> None:
        survivors = await process.end_group(runner.pid, self._settings.kill_grace)
        if survivors:
            log.error("runner %s group survived SIGKILL: %s", runner.id, survivors)

    async def shutdown(self) -> None:
        await asyncio.gather(*(self.stop(r, "daemon_stopped") for r in list(self.runners.values())))

    async def watch(self, period: float = 0.2) -> None:
        """Enforce every limit, a few times a second, until cancelled.

        Idle runners past the TTL are stopped; runners past a load, stall or memory limit are
        ended with that reason; runs waiting past the queue timeout are refused.
        """
        limits = Limits.from_settings(self._settings)
        sampled = 0.0
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - sampled >= MEMORY_SAMPLE_PERIOD:
                sampled = now
                await self._sample_memory()
            for runner in list(self.runners.values()):
                self._enforce(runner, limits, now)

    async def _sample_memory(self) -> None:
        runners = [r for r in self.runners.values() if r.ending is None]
        sizes = await asyncio.gather(
            *(asyncio.to_thread(process.tree_memory, r.pid) for r in runners)
        )
        for runner, size in zip(runners, sizes, strict=True):
            runner.memory = size

    def _enforce(self, runner: Runner, limits: Limits, now: float) -> None:
        watch = Watch(
            state=runner.state,
            now=now,
            spawned_at=runner.spawned_at,
            last_progress=runner.last_progress,
            decoding=runner.decoding,
            memory=runner.memory,
        )
        broken = verdict(limits, watch)
        if broken is not None:
            log.warning("runner %s: %s", runner.id, broken[1])
            self.stop_soon(runner, *broken)
            return
        idle = runner.state == "ready" and runner.current is None and not runner.queue
        if idle and now - runner.last_used >= self._settings.idle_ttl:
            self.stop_soon(runner, "idle")
        if runner.ready_at is None:
            return  # runs waiting for a load answer to the load limits, not the queue timeout
        for job in [
            j
            for j in runner.queue
            if now - _waiting_since(j, runner) > self._settings.queue_timeout
        ]:
            runner.queue.remove(job)
            job.finish(
                ExoError(
                    "queue_timeout",
                    f"waited {now - _waiting_since(job, runner):.0f}s for runner {runner.id} "
                    f"(EXOD_QUEUE_TIMEOUT={self._settings.queue_timeout:g}); retry later",
                )
            )

    # --- spawning ---------------------------------------------------------------------------------

    def _live_for(self, model_path: str) -> Runner | None:
        for runner in self.runners.values():
            if runner.model_path == model_path and runner.ending is None:
                return runner
        return None

    async def _spawn(self, model: str, model_path: str) -> Runner:
        runner_id = "r-" + secrets.token_hex(4)
        self._logs.mkdir(parents=True, exist_ok=True)
        log_path = self._logs / f"{runner_id}.log"
        ours, theirs = socket.socketpair()
        lifeline_read, lifeline_write = os.pipe()
        command = runner_command(
            lifeline_read, theirs.fileno(), os.getpid(), self._settings.runner_wrapper
        )
        env = runner_env(os.environ, self._settings.home, runner_id)
        # A local append-only file opens at once; no need to leave the loop for it.
        with open(log_path, "ab") as log_file, ours, theirs:  # noqa: ASYNC230
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    pass_fds=(theirs.fileno(), lifeline_read),
                    start_new_session=True,  # its own process group: one signal ends all of it
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                )
            except OSError as e:
                os.close(lifeline_write)
                raise ExoError("internal", f"cannot start a runner: {e}") from e
            finally:
                os.close(lifeline_read)
            reader, writer = await asyncio.open_unix_connection(sock=ours.dup())
        runner = Runner(runner_id, model, model_path, proc, reader, writer, log_path)
        runner.lifeline = lifeline_write
        if self._cgroups.base is not None:
            members = [proc.pid, *process.group_members(proc.pid)]
            cap = self._settings.max_runner_memory
            runner.cgroup = self._cgroups.limit(runner_id, members, cap)
        spawned = events_pb2.RunnerSpawned(
            runner_id=runner_id,
            model=model,
            model_path=model_path,
            pid=proc.pid,
            start_time=process.start_time_of(proc.pid),
            log_path=str(log_path),
        )
        try:
            self._journal.append(events_pb2.Event(runner_spawned=spawned))
        except StoreError:
            # A runner the log does not know of could never be closed at restart: end it now.
            await asyncio.to_thread(process.kill_group_now, proc.pid)
            await proc.wait()
            writer.close()
            os.close(lifeline_write)
            raise
        self.runners[runner_id] = runner
        log.info("spawned runner %s pid %d for %s", runner_id, proc.pid, model)
        runner.tasks = [
            asyncio.create_task(self._read(runner)),
            asyncio.create_task(self._work(runner)),
            asyncio.create_task(self._watch(runner)),
        ]
        hello = runner_pb2.Hello(protocol_version=RUNNER_PROTOCOL_VERSION)
        load = runner_pb2.Load(model_path=model_path)
        self._send_soon(runner, runner_pb2.ToRunner(hello=hello))
        self._send_soon(runner, runner_pb2.ToRunner(load=load))
        return runner

    # --- the three tasks of a runner -------------------------------------------------------------

    async def _read(self, runner: Runner) -> None:
        started = time.monotonic()
        try:
            while (
                msg := await pipe.read_message(runner.reader, runner_pb2.FromRunner)
            ) is not None:
                self._dispatch(runner, msg, started)
        except (pipe.PipeError, ConnectionError) as e:
            log.warning("runner %s pipe broke: %s", runner.id, e)

    def _dispatch(self, runner: Runner, msg: runner_pb2.FromRunner, started: float) -> None:
        which = msg.WhichOneof("msg")
        current = runner.current
        if which in PROGRESS:
            runner.last_progress = time.monotonic()
        if which == "hello":
            self._on_hello(runner, msg.hello)
        elif which == "progress":
            self._on_progress(runner, msg.progress)
        elif which == "ready":
            runner.state = "ready"
            runner.last_used = runner.ready_at = time.monotonic()
            runner.ready.set()
            ready = events_pb2.RunnerReady(runner_id=runner.id, load_s=time.monotonic() - started)
            self._record(runner, events_pb2.Event(runner_ready=ready))
        elif which == "tokens":
            if current is not None and current.run_id == msg.tokens.request_id:
                runner.decoding = True
                current.out.put_nowait(msg.tokens)
        elif which == "done":
            if current is not None and current.run_id == msg.done.request_id:
                current.finish(msg.done)
        elif which == "error":
            err = ExoError(msg.error.reason or "internal", msg.error.message)
            if not msg.error.request_id:
                runner.load_error = err  # the load failed; the runner exits next
            elif current is not None and current.run_id == msg.error.request_id:
                current.finish(err)

    def _on_hello(self, runner: Runner, hello: runner_pb2.HelloReply) -> None:
        if hello.protocol_version != RUNNER_PROTOCOL_VERSION:
            runner.load_error = ExoError(
                "internal",
                f"runner speaks protocol {hello.protocol_version}, exod speaks "
                f"{RUNNER_PROTOCOL_VERSION}: reinstall exod so both come from one version",
            )
            self.stop_soon(runner, "crashed")

    def _on_progress(self, runner: Runner, progress: runner_pb2.LoadProgress) -> None:
        """Prefill progress belongs to the job running; load progress to every job waiting."""
        if progress.phase == "prefill":
            if runner.current is not None:
                runner.current.out.put_nowait(progress)
        else:
            for job in runner.queue:
                job.out.put_nowait(progress)

    async def _work(self, runner: Runner) -> None:
        await runner.ready.wait()
        while True:
            while not runner.queue:
                runner.wake.clear()
                await runner.wake.wait()
            job = runner.queue.popleft()
            runner.current = job
            runner.state = "running"
            runner.decoding = False
            runner.last_progress = time.monotonic()
            await pipe.write_message(runner.writer, runner_pb2.ToRunner(generate=job.request))
            await job.finished.wait()
            runner.current = None
            runner.state = "ready"
            runner.last_used = time.monotonic()

    async def _watch(self, runner: Runner) -> None:
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
        if self._cgroups.oom_killed(runner.cgroup) and runner.ending is None:
            runner.ending = "memory_limit"
            runner.ending_detail = (
                "the kernel ended it at the cap of "
                f"{self._settings.max_runner_memory >> 20} MiB (EXOD_MAX_RUNNER_MEMORY, memory.max)"
            )
        self._cgroups.remove(runner.cgroup)
        failure = self._record_end(runner, status)
        for job in [*([runner.current] if runner.current else []), *runner.queue]:
            job.finish(failure)
        runner.queue.clear()
        del self.runners[runner.id]
        runner.ended.set()

    def _record_end(self, runner: Runner, status: int) -> ExoError:
        """Log how the runner ended and return the error its unfinished jobs get."""
        if runner.ending is not None and runner.ending not in FAILURES:
            reason = runner.ending
            stopped = events_pb2.RunnerStopped(runner_id=runner.id, reason=reason)
            self._record(runner, events_pb2.Event(runner_stopped=stopped))
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
        self._record(runner, events_pb2.Event(runner_failed=failed))
        return err

    def _record(self, runner: Runner, event: events_pb2.Event) -> None:
        """Log a fact about a live runner; a full disk must not stop us from ending it.

        A runner whose end is missing from the log is closed as interrupted at the next start.
        """
        try:
            self._journal.append(event)
        except StoreError:
            log.exception("runner %s: %s not logged", runner.id, event.WhichOneof("kind"))

    def _send_soon(self, runner: Runner, msg: runner_pb2.ToRunner) -> None:
        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                await pipe.write_message(runner.writer, msg)

        task = asyncio.create_task(send())
        runner.tasks.append(task)


def _waiting_since(job: Job, runner: Runner) -> float:
    """When a queued job started waiting for a busy runner (not for its load)."""
    return max(job.enqueued_at, runner.ready_at or job.enqueued_at)


def _stop_message(runner: Runner, reason: str) -> str:
    if reason == "killed":
        return f"runner {runner.id} was killed (exoctl kill) during this run"
    if reason == "daemon_stopped":
        return "exod is shutting down"
    return f"runner {runner.id} was stopped ({reason})"


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    tail = [line for line in lines if line.strip()][-LOG_TAIL_LINES:]
    return " | ".join(tail) if tail else "(the log is empty)"
