"""A member's side of the peer call Rank: it runs one rank of a split model for as long as the
coordinator's stream lasts.

The stream is the lease. The first message names the instance, the cache entry holding this
rank's part (pushed before, exod/cluster/weights_push.py) and the ring; the member pins that
entry (`ModelCache.use`), admits the rank's memory as it admits any runner's, and spawns the
rank's runner through its supervisor, so that every limit of a runner holds for it. It then
says how the rank goes (spawned, ready, ended) and a heartbeat every third of
EXOD_PEER_TIMEOUT. When nothing arrives from the coordinator for EXOD_PEER_TIMEOUT, or the
stream ends for any reason, the member ends the rank's runner (SIGTERM, then SIGKILL after
EXOD_KILL_GRACE, as the supervisor ends any runner): no rank is left waiting on a ring.

One split model per node at a time: the ring port (EXOD_RING_PORT) is one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from exod.cluster import versions
from exod.cluster.protocol import check_version
from exod.config import Settings
from exod.errors import ExoError
from exod.models.cache import ModelCache
from exod.models.inspect import inspect_model
from exod.proto.exo.v1 import peer_pb2, runner_pb2
from exod.runners.admission import estimate
from exod.runners.supervisor import Runner, Supervisor

log = logging.getLogger(__name__)


def state(name: str, runner_id: str = "", error: ExoError | None = None) -> peer_pb2.RankDown:
    rank_state = peer_pb2.RankState(state=name, runner_id=runner_id)
    if error is not None:
        rank_state.reason, rank_state.message = error.reason, error.message
    return peer_pb2.RankDown(state=rank_state)


def ended_error(runner: Runner) -> ExoError:
    """Why a rank's runner ended, as the coordinator is told."""
    if runner.load_error is not None:
        return runner.load_error
    reason = runner.ending or "rank_failed"
    detail = runner.ending_detail or f"its runner {runner.id} ended ({reason})"
    return ExoError(reason, detail)


class RankHost:
    def __init__(
        self, settings: Settings, node_id: str, supervisor: Supervisor, cache: ModelCache
    ) -> None:
        self._settings = settings
        self._id = node_id
        self._supervisor = supervisor
        self._cache = cache
        self._running: str | None = None  # the instance whose rank runs here
        # Its runner, when it is rank 0 or the whole model (it takes the coordinator's runs),
        # with the coordinator's node id.
        self._lead: tuple[Runner, str] | None = None
        # The instance this node coordinates, if any (its rank 0 holds the ring port too).
        self.coordinating: Callable[[], str | None] = lambda: None
        self._versions = versions.ours()

    @property
    def running(self) -> str | None:
        """The instance whose rank runs here for a coordinator, if any."""
        return self._running

    def _heartbeat(self) -> peer_pb2.PeerHeartbeat:
        return peer_pb2.PeerHeartbeat(name=self._settings.node_name)

    async def serve(
        self, requests: AsyncIterator[peer_pb2.RankUp], caller: str
    ) -> AsyncIterator[peer_pb2.RankDown]:
        timeout = self._settings.peer_timeout
        try:
            first = await asyncio.wait_for(anext(requests), timeout)
        except (TimeoutError, StopAsyncIteration):
            return
        check_version(first.protocol_version, f"coordinator {caller}")
        if first.WhichOneof("msg") != "start":
            raise ExoError("invalid_argument", "a Rank stream starts with `start`")
        start = first.start
        held = self._running or self.coordinating()
        if held is not None:
            yield state(
                "ended",
                error=ExoError(
                    "rank_failed",
                    f"it runs a rank of instance {held} already, and runs one split "
                    "model at a time (one ring port, EXOD_RING_PORT): end that one "
                    f"(`exoctl kill {held}` on its coordinator) or place this one "
                    "elsewhere",
                ),
            )
            return
        refusal = self._check_ring(start) or self._check_versions(start)
        if refusal is not None:
            yield state("ended", error=refusal)
            return
        self._running = start.instance_id
        try:
            async for down in self._run(start, requests, caller):
                yield down
        finally:
            self._running = None

    def _check_ring(self, start: peer_pb2.RankStart) -> ExoError | None:
        """The ring socket the coordinator gave this rank must be this node's ring port: the
        coordinator uses its own EXOD_RING_PORT for every rank."""
        if not 0 <= start.rank < len(start.hosts) or len(start.hosts) != start.size:
            return ExoError("invalid_argument", "a Rank start whose rank has no ring address")
        port = start.hosts[start.rank].rpartition(":")[2]
        if port != str(self._settings.ring_port):
            return ExoError(
                "invalid_argument",
                f"its EXOD_RING_PORT is {self._settings.ring_port}, the coordinator's {port}: "
                "set the same EXOD_RING_PORT on every member",
            )
        return None

    def _check_versions(self, start: peer_pb2.RankStart) -> ExoError | None:
        differ = versions.mismatch(dict(start.versions), self._versions)
        if differ is None:
            return None
        return ExoError(
            "protocol_mismatch",
            f"every rank of a split model must run the same exod, mlx and mlx-lm: {differ}; "
            "install the same versions on every member",
        )

    async def _run(
        self, start: peer_pb2.RankStart, requests: AsyncIterator[peer_pb2.RankUp], caller: str
    ) -> AsyncIterator[peer_pb2.RankDown]:
        try:
            with self._cache.use(start.key) as path:
                files = await asyncio.to_thread(inspect_model, path)
                # A rank of one is the whole model, in a runner as any other (no ring).
                rank = (
                    runner_pb2.Rank(
                        rank=start.rank,
                        size=start.size,
                        split=start.split,
                        hosts=start.hosts,
                        ring_timeout_s=start.ring_timeout_s,
                    )
                    if start.size > 1
                    else None
                )
                runner = await self._supervisor.start_rank(
                    start.model, str(path), rank, estimate(files.weight_bytes)
                )
                if start.rank == 0:
                    self._lead = (runner, caller)
                log.info(
                    "rank %d of %s (%s) for %s: runner %s",
                    start.rank,
                    start.instance_id,
                    start.model,
                    caller,
                    runner.id,
                )
                try:
                    async for down in self._lease(runner, requests):
                        yield down
                finally:
                    self._lead = None
                    await self._end(runner, start.instance_id)
        except ExoError as e:
            yield state("ended", error=e)

    async def _lease(
        self, runner: Runner, requests: AsyncIterator[peer_pb2.RankUp]
    ) -> AsyncIterator[peer_pb2.RankDown]:
        """The rank's states and heartbeats until its runner ends or the lease does."""
        timeout = self._settings.peer_timeout
        seen = time.monotonic()
        closed = asyncio.Event()

        async def read() -> None:
            nonlocal seen
            with contextlib.suppress(Exception):
                async for _ in requests:
                    seen = time.monotonic()
            closed.set()

        reader = asyncio.create_task(read())
        beat = timeout / 3
        try:
            yield state("spawned", runner.id)
            told_ready, sent = False, time.monotonic()
            while True:
                # Looked at twice per beat: a lapse is seen within a sixth of the timeout.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runner.ended.wait(), beat / 2)
                if runner.ready_at is not None and not told_ready:
                    told_ready = True
                    yield state("ready", runner.id)
                if runner.ended.is_set() or runner.ending is not None:
                    await runner.ended.wait()
                    yield state("ended", runner.id, ended_error(runner))
                    return
                if closed.is_set():
                    self._supervisor.stop_soon(
                        runner, "rank_failed", "the coordinator ended the instance"
                    )
                    return
                if time.monotonic() - seen > timeout:
                    self._supervisor.stop_soon(
                        runner,
                        "peer_unreachable",
                        f"nothing came from the coordinator for {timeout:g}s (EXOD_PEER_TIMEOUT)",
                    )
                    return
                if time.monotonic() - sent >= beat:
                    sent = time.monotonic()
                    yield peer_pb2.RankDown(heartbeat=self._heartbeat())
        finally:
            reader.cancel()

    async def _end(self, runner: Runner, instance_id: str) -> None:
        """End the rank's runner unless it has ended, and wait until it has (the pin holds the
        cache entry until then)."""
        if not runner.ended.is_set():
            log.info("ending rank runner %s of %s", runner.id, instance_id)
            self._supervisor.stop_soon(runner, "rank_failed", "its instance ended")
            await asyncio.shield(runner.ended.wait())

    async def generate(
        self, request: peer_pb2.GenerateRequest, caller: str
    ) -> AsyncIterator[peer_pb2.GenerateReply]:
        """One run of the instance whose rank 0 (or whole model) runs here, for its coordinator,
        or of a model a runner here runs already (by content hash), for any member: queued on
        that runner as this node's own runs are, until it ends or the call does."""
        check_version(request.protocol_version, f"node {caller}")
        runner = self._runner_for(request, caller)
        started: list[peer_pb2.GenerateStarted] = []

        def accept(runner_id: str, position: int) -> None:
            started.append(peer_pb2.GenerateStarted(runner_id=runner_id, queue_position=position))

        # Admission as for this node's own runs: the estimate of its part (the cap holds).
        job = await self._supervisor.submit(
            runner.model,
            runner.model_path,
            request.generate.request_id,
            request.generate,
            accept,
            need=runner.estimate,
        )
        try:
            yield peer_pb2.GenerateReply(started=started[0])
            while True:
                item = await job.out.get()
                if isinstance(item, ExoError):
                    raise item
                if isinstance(item, runner_pb2.LoadProgress):
                    yield peer_pb2.GenerateReply(progress=item)
                elif isinstance(item, runner_pb2.Tokens):
                    yield peer_pb2.GenerateReply(tokens=item)
                else:
                    yield peer_pb2.GenerateReply(done=item)
                    return
        finally:
            self._supervisor.cancel(job)  # nothing once it has ended

    def _runner_for(self, request: peer_pb2.GenerateRequest, caller: str) -> Runner:
        if not request.instance_id:
            runner = self._supervisor.live_with(request.content_hash)
            if runner is None:
                raise ExoError(
                    "runner_not_found",
                    f"node {self._id} runs that model no more: run it again to place it anew",
                )
            return runner
        lead = self._lead
        if lead is None or self._running != request.instance_id or lead[1] != caller:
            raise ExoError(
                "runner_not_found",
                f"node {self._id} runs no rank 0 of instance {request.instance_id} for node "
                f"{caller}: it has ended",
            )
        return lead[0]
