"""The supervisor: admits generations to runners, spawns and ends runners, enforces every limit.

Each runner (exod.runners.handle) has two tasks: a reader that routes its messages to the jobs
they name (exod.runners.dispatch, which also hands it queued jobs whenever they fit), and a
watcher that turns its exit into exactly one RunnerFailed or RunnerStopped event and fails each
run it still owed (exod.runners.ending). A runner runs up to EXOD_PARALLEL generations at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from exod.config import Settings
from exod.errors import ExoError
from exod.journal import Journal
from exod.models.inspect import kv_bytes_per_token, read_config
from exod.proto.exo.v1 import runner_pb2
from exod.runners import admission, dispatch, ending, handle, process
from exod.runners.cgroup import MemoryCgroups
from exod.runners.handle import Job, JobItem, Runner
from exod.runners.limits import Limits, Watch, verdict

__all__ = ["Job", "JobItem", "Runner", "Supervisor"]

log = logging.getLogger(__name__)

# Measuring a tree's USS reads /proc/*/smaps: cheap, but not worth doing five times a second.
MEMORY_SAMPLE_PERIOD = 0.5


class Supervisor:
    def __init__(
        self, journal: Journal, settings: Settings, cgroups: MemoryCgroups | None = None
    ) -> None:
        self._journal = journal
        self._settings = settings
        self._cgroups = cgroups or MemoryCgroups(None)
        self.runners: dict[str, Runner] = {}
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

        `need` is the memory a new runner is estimated to take (None: skip the estimates, the
        runner's and the run's own, as --force asks; the cap is enforced all the same).
        `accept(runner_id, queue_position)` runs after admission and before the job can start,
        so the run is in the log before any token of it exists; the position is 0 when the job
        starts at once, else 1 + the jobs waiting ahead of it.
        """
        async with self._spawning:
            runner = self._live_for(model_path)
            if runner is None:
                kv = await asyncio.to_thread(_config_kv_bytes, model_path)
                if need is not None:
                    # Refused before a runner is spawned for a run that could never fit.
                    admission.check_alone(
                        dispatch.need_of(request, kv), need, self._settings.max_runner_memory
                    )
                    await self._make_room(need)
                # Shielded: a client that leaves mid-spawn must not strand a started process
                # that is not yet registered; the runner lives on and idles out if unused.
                runner = await asyncio.shield(self._spawn(model, model_path, need, kv))
        reservation = dispatch.need_of(request, runner.kv_bytes_per_token)
        if need is not None:
            admission.check_alone(
                reservation, runner.model_memory, self._settings.max_runner_memory
            )
        if len(runner.queue) >= self._settings.queue_depth:
            raise ExoError(
                "queue_full",
                f"{len(runner.queue)} runs are already waiting for runner {runner.id} "
                f"(EXOD_QUEUE_DEPTH={self._settings.queue_depth}); retry later",
            )
        # Jobs that fit start as soon as they are queued, so the queue holds only jobs that wait.
        at_once = (
            runner.ready_at is not None
            and runner.ending is None
            and not runner.queue
            and admission.may_start(dispatch.occupancy(runner, self._settings), reservation)
        )
        accept(runner.id, 0 if at_once else len(runner.queue) + 1)
        job = Job(run_id=run_id, request=request, force=need is None)
        runner.queue.append(job)
        dispatch.start_fitting(runner, self._settings)
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
            if r.ending is None
            and r.state == "ready"
            and not r.active
            and not r.queue
            and not _follower(r)
        ]
        for runner_id in admission.plan(need, memory, idle):
            await self.stop(self.runners[runner_id], "evicted")

    def cancel(self, job: Job) -> None:
        """Stop a job wherever it is: drop it from its queue, or tell its runner to stop it."""
        if job.finished.is_set():
            return
        for runner in self.runners.values():
            if job in runner.queue:
                runner.queue.remove(job)
                job.finish(ExoError("cancelled", "cancelled while waiting"))
                dispatch.start_fitting(runner, self._settings)  # it may have held up the next
                return
            if runner.active.get(job.run_id) is job:
                # It stays active (its reservation held) until the runner's Done says it left.
                runner.send_soon(
                    runner_pb2.ToRunner(cancel=runner_pb2.Cancel(request_id=job.run_id))
                )
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

    # --- limits -----------------------------------------------------------------------------------

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
            if size and runner.state == "ready" and not runner.active:
                # What it takes with nothing running: the model, for admission's "alone".
                runner.idle_memory = min(size, runner.idle_memory or size)
            dispatch.start_fitting(runner, self._settings)  # a job waiting for memory may fit now

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
        idle = (
            runner.state == "ready" and not runner.active and not runner.queue
        ) and not _follower(runner)
        if idle and now - runner.last_used >= self._settings.idle_ttl:
            self.stop_soon(runner, "idle")
        if runner.ready_at is None:
            return  # runs waiting for a load answer to the load limits, not the queue timeout
        timeout = self._settings.queue_timeout
        for job in [j for j in runner.queue if now - _waiting_since(j, runner) > timeout]:
            runner.queue.remove(job)
            job.finish(
                ExoError(
                    "queue_timeout",
                    f"waited {now - _waiting_since(job, runner):.0f}s for runner {runner.id} "
                    f"(EXOD_QUEUE_TIMEOUT={timeout:g}); retry later",
                )
            )
            dispatch.start_fitting(runner, self._settings)

    # --- runners ----------------------------------------------------------------------------------

    def _live_for(self, model_path: str) -> Runner | None:
        for runner in self.runners.values():
            if runner.model_path == model_path and runner.ending is None and not _follower(runner):
                return runner
        return None

    def live_for(self, model_path: str) -> Runner | None:
        """The live runner that runs would be queued on for this directory, if any."""
        return self._live_for(model_path)

    def live_with(self, content_hash: str) -> Runner | None:
        """A live runner that runs would be queued on whose model has this content hash."""
        for runner in self.runners.values():
            # A rank's runner holds part of a model (or serves its instance): never borrowed.
            whole = runner.rank is None and runner.content_hash == content_hash
            if whole and runner.ending is None:
                return runner
        return None

    async def start_rank(
        self, model: str, model_path: str, rank: runner_pb2.Rank | None, need: int
    ) -> Runner:
        """Spawn one rank of a split model: a runner loaded with `rank` (rank 0 then takes runs
        for `model_path` like any runner; another rank takes none), or with None the whole
        model for a coordinator elsewhere. Its memory is admitted as a runner's is: `need` is
        admission's estimate of what its part of the weights takes."""
        async with self._spawning:
            live = self._live_for(model_path)
            if live is not None and (rank is None or rank.rank == 0):
                raise ExoError(
                    "invalid_argument",
                    f"runner {live.id} runs {model} already: `exoctl kill {live.id}` first",
                )
            await self._make_room(need)
            return await self._spawn(
                model, model_path, need, _config_kv_bytes(model_path), rank=rank
            )

    async def _spawn(
        self,
        model: str,
        model_path: str,
        estimate: int | None,
        kv: int,
        rank: runner_pb2.Rank | None = None,
    ) -> Runner:
        settings = self._settings
        runner = await handle.spawn(settings, self._journal, self._cgroups, model, model_path)
        runner.rank = rank
        runner.estimate = estimate
        runner.kv_bytes_per_token = kv
        self.runners[runner.id] = runner
        runner.tasks = [
            asyncio.create_task(dispatch.read(runner, settings, self._journal, self.stop_soon)),
            asyncio.create_task(self._watch(runner)),
        ]
        for msg in handle.greeting(settings, model_path, rank):
            runner.send_soon(msg)
        return runner

    async def _watch(self, runner: Runner) -> None:
        await ending.await_end(runner, self._settings, self._cgroups, self._journal)
        del self.runners[runner.id]
        runner.ended.set()


def _config_kv_bytes(model_path: str) -> int:
    """KV bytes per token from config.json, until the runner reports its own (0: unknown)."""
    with contextlib.suppress(ExoError):
        return kv_bytes_per_token(read_config(Path(model_path)))
    return 0


def _follower(runner: Runner) -> bool:
    """A rank other than 0 of a split model: it takes no runs, and its lease ends it."""
    return runner.rank is not None and runner.rank.rank != 0


def _waiting_since(job: Job, runner: Runner) -> float:
    """When a queued job started waiting for a busy runner (not for its load)."""
    return max(job.enqueued_at, runner.ready_at or job.enqueued_at)
