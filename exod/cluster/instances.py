"""The coordinator: a model split over members runs as one instance (`i-…`), started and stopped
as one by the node that got the request.

`ensure` makes the plan (planning.py), logs InstancePlaced, sends each remote rank its part of
the weights where the member does not hold it (weights_push.push_layers), asks each member to
run its rank over the peer call Rank (the member's side is rank_host.py), and then spawns rank 0
here through the supervisor: a runner whose Load.rank is set, which runs are queued on like any
runner's, so `exoctl run` and the HTTP API stream its tokens unchanged. When the plan leaves this
node out (a split over other members, or the model whole on one: an instance of one rank), rank 0
runs on its member, and runs go there over Generate (member_runs.py); likewise to a member's own
runner when the plan finds the model loaded there.

Stopping as one: each Rank stream is a member's lease. Whatever ends first ends them all: a
member's rank that ends (its state `ended`), a member silent for EXOD_PEER_TIMEOUT, rank 0's
runner ending here (it fails with rank_failed within about a second when any peer of its ring
dies), or `exoctl kill i-…`. Ending closes every stream (each member then ends its rank) and
stops rank 0's runner; the runs it owed fail with the reason, and InstanceEnded says it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from exod.cluster import tls_store, versions
from exod.cluster.control import Cluster
from exod.cluster.member_runs import Target
from exod.cluster.peer_server import endpoint, peer_channel
from exod.cluster.placement import Plan, Rank
from exod.cluster.planning import Planner
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.cluster.weights_push import push_layers
from exod.config import Settings
from exod.errors import ExoError, from_peer
from exod.eventlog import StoreError
from exod.eventlog.fold import MemberView
from exod.journal import Journal
from exod.models.inspect import ModelFiles
from exod.proto.exo.v1 import control_pb2, events_pb2, peer_pb2, peer_pb2_grpc, runner_pb2
from exod.runners.supervisor import Runner, Supervisor

log = logging.getLogger(__name__)

# Told how the start of an instance goes (the weights sent to members), for `exoctl run`.
Progress = Callable[[control_pb2.Progress], None]
PROGRESS_EVERY_S = 0.25  # the most often a run is told of bytes sent

RankCall = grpc.aio.StreamStreamCall[peer_pb2.RankUp, peer_pb2.RankDown]


@dataclass(eq=False)
class Link:
    """A remote rank: the member's lease stream."""

    rank: Rank
    member: MemberView
    channel: grpc.aio.Channel | None = None
    call: RankCall | None = None
    replies: AsyncIterator[peer_pb2.RankDown] | None = None
    state: str = "starting"  # starting, sending, spawned, ready, ended
    runner_id: str = ""
    key: str = ""  # its part's cache key, once pushed
    sent: int = 0  # bytes of its part streamed to the member so far
    total: int = 0  # bytes of its part: 0 until it is written out and hashed


@dataclass(eq=False)
class Instance:
    id: str
    model: str
    model_path: str
    ranks: tuple[Rank, ...]
    links: list[Link]
    runner: Runner | None = None  # rank 0, here
    state: str = "starting"  # starting, running, ended
    reason: str = ""
    message: str = ""  # why it ended
    ending: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Instances:
    def __init__(
        self,
        settings: Settings,
        node_id: str,
        journal: Journal,
        supervisor: Supervisor,
        *,
        cluster: Cluster,
        planner: Planner,
    ) -> None:
        self._settings = settings
        self._id = node_id
        self._journal = journal
        self._supervisor = supervisor
        self._cluster = cluster
        self.planner = planner
        self.instances: dict[str, Instance] = {}
        self._lock = asyncio.Lock()

    # --- starting ---------------------------------------------------------------------------------

    async def ensure(
        self,
        model: str,
        files: ModelFiles,
        forced: list[str],
        progress: Progress = lambda _: None,
    ) -> Target | None:
        """Where runs of `model` go when not to a runner of this node's: an instance's rank 0
        on a member (started here when the plan says so and none runs it yet), or a member's
        own runner of the same model (member_runs.py); None when it runs here. Without
        `forced` (no --on), a plan for this node or for nowhere leaves the run to this node's
        own admission, as outside a cluster. ExoError when it cannot start (every rank
        started is ended again then)."""
        if any(not node for node in forced):
            raise ExoError("invalid_argument", "an empty node id in --on: give node ids")
        if not forced and self._cluster.info() is None:
            return None  # no cluster: every model runs whole here
        async with self._lock:
            path = str(files.path)
            if self._supervisor.live_for(path) is not None:
                return None  # loaded here already (whole, or as rank 0 of an instance)
            lead = self.lead_elsewhere(path)
            if lead is not None:
                return lead  # an instance runs it already, its rank 0 on a member
            plan = await self._plan(files, forced)
            if plan is None:
                return None
            if plan.loaded and plan.whole_on is not None and plan.whole_on != self._id:
                # A member runs the same model for its own clients: runs join that runner.
                return Target(
                    self._member(plan.whole_on),
                    content_hash=plan.content_hash,
                    material=self._cluster.material,
                )
            ranks = _ranks_here(plan, self._id)
            if ranks:
                await self._start(model, files, ranks, progress)
            return self.lead_elsewhere(path)

    async def _plan(self, files: ModelFiles, forced: list[str]) -> Plan | None:
        """The plan to follow; None where this node's own admission decides (the plan runs it
        here, or nowhere, and --on did not ask for it)."""
        try:
            plan = await self.planner.plan(files, forced)
        except ExoError:
            if forced:
                raise
            return None  # a model placement cannot read runs, or fails, here as ever
        if not forced and (plan.whole_on == self._id or plan.refused is not None):
            return None
        return plan

    async def _start(
        self, model: str, files: ModelFiles, ranks: tuple[Rank, ...], progress: Progress
    ) -> None:
        material = self._cluster.material
        if material is None:
            raise ExoError(
                "invalid_argument", "this node is in no cluster: it cannot split a model"
            )
        self._one_ring_at_a_time()
        links = [Link(r, self._member(r.node)) for r in ranks if r.node != self._id]
        instance = Instance("i-" + secrets.token_hex(4), model, str(files.path), ranks, links)
        self._log_placed(instance)
        self.instances[instance.id] = instance
        try:
            await self._push(instance, material, files, progress)
            hosts = self._hosts(instance)
            await asyncio.gather(*(self._open(instance, link, material, hosts) for link in links))
            if ranks[0].node == self._id:
                rank = _rank_message(ranks[0], ranks, hosts, self._ring_timeout())
                instance.runner = await self._supervisor.start_rank(
                    model, str(files.path), rank, ranks[0].bytes
                )
                instance.runner.instance = instance.id
        except ExoError as e:
            await self._end(instance, e.reason, e.message)
            raise
        except BaseException:
            await self._end(instance, "internal", "the instance could not start")
            raise
        instance.state = "running"
        if instance.runner is not None:
            instance.tasks.append(asyncio.create_task(self._watch_rank0(instance)))
        for link in links:
            instance.tasks.append(asyncio.create_task(self._watch_link(instance, link)))

    def coordinating(self) -> str | None:
        """The instance this node coordinates, if any."""
        return next(iter(self.instances), None)

    def _one_ring_at_a_time(self) -> None:
        """Rank 0 listens on this node's ring port, which one split model at a time holds."""
        ranks = self._cluster.ranks
        held = self.coordinating() or (ranks.running if ranks else None)
        if held is not None:
            raise ExoError(
                "rank_failed",
                f"this node runs a rank of instance {held} already, and runs one split model at "
                f"a time (one ring port, EXOD_RING_PORT): end that one (`exoctl kill {held}` on "
                "its coordinator) or run this one from another node",
            )

    def _member(self, node: str) -> MemberView:
        member = self._journal.state.members.get(node)
        if member is None:
            raise ExoError("node_not_found", f"node {node} is no member of this cluster")
        return member

    def _ring_timeout(self) -> float:
        # Every rank loads its layers before it joins: the ring may take as long as a load.
        return self._settings.load_stall_timeout

    def _hosts(self, instance: Instance) -> list[str]:
        """Each rank's ring socket, by rank: this node's peer address for its rank, each
        member's first address for its; the port is EXOD_RING_PORT, the same on every member."""
        port = self._settings.ring_port
        mine = self._cluster.addresses()
        by_rank = {link.rank.rank: link.member for link in instance.links}
        hosts = []
        for r in instance.ranks:
            member = by_rank.get(r.rank)
            if member is None:
                if not mine:
                    raise ExoError(
                        "peer_unreachable",
                        "this node has no address members can reach (EXOD_PEER_BIND): set it "
                        "to this machine's address on the cluster's network",
                    )
                hosts.append(endpoint(mine[0], port))
            elif not member.addresses:
                raise ExoError(
                    "peer_unreachable",
                    f"this node knows no address of node {member.id}: start exod there "
                    "and let it reach this node, then retry",
                )
            else:
                hosts.append(endpoint(member.addresses[0], port))
        return hosts

    async def _push(
        self,
        instance: Instance,
        material: tls_store.Material,
        files: ModelFiles,
        progress: Progress,
    ) -> None:
        scratch = self._settings.home / "cache" / "outgoing"
        nodes = ", ".join(link.member.id for link in instance.links)
        told = 0.0

        def tell(force: bool = False) -> None:
            nonlocal told
            now = time.monotonic()
            if force or now - told >= PROGRESS_EVERY_S:
                told = now
                sent = sum(link.sent for link in instance.links)
                total = sum(link.total for link in instance.links)
                phase = f"sending weights to {nodes}"
                progress(control_pb2.Progress(phase=phase, current=sent, total=total, unit="bytes"))

        async def one(link: Link) -> None:
            r = link.rank
            link.state = "sending"

            def moved(sent: int, total: int) -> None:
                link.sent, link.total = sent, total
                tell(force=sent == total)

            pushed = await push_layers(
                material,
                link.member,
                files.path,
                range(r.first_layer, r.last_layer + 1),
                scratch=scratch,
                timeout=self._settings.peer_timeout,
                progress=moved,
            )
            link.key = pushed.key
            link.state = "starting"
            log.info(
                "%s: rank %d's part (%d bytes) %s node %s",
                instance.id,
                r.rank,
                pushed.total,
                "held already by" if pushed.had else "sent to",
                link.member.id,
            )

        progress(control_pb2.Progress(phase=f"writing out the layers for {nodes}"))
        await asyncio.gather(*(one(link) for link in instance.links))

    async def _open(
        self,
        instance: Instance,
        link: Link,
        material: tls_store.Material,
        hosts: list[str],
    ) -> None:
        """Ask the member to run its rank; return once it says its runner is spawned."""
        member, timeout = link.member, self._settings.peer_timeout
        target = endpoint(member.addresses[0], member.port)
        link.channel = peer_channel(material, member.id, target)
        start = peer_pb2.RankStart(
            instance_id=instance.id,
            key=link.key,
            model=instance.model,
            rank=link.rank.rank,
            size=len(instance.ranks),
            split=_split(instance.ranks),
            hosts=hosts,
            ring_timeout_s=self._ring_timeout(),
            versions=versions.ours(),
        )
        stub = peer_pb2_grpc.PeerStub(link.channel)
        call = stub.Rank(self._up(instance, start))
        link.call = call
        link.replies = aiter(call)
        try:
            down: peer_pb2.RankDown | None = await asyncio.wait_for(anext(link.replies), timeout)
        except (TimeoutError, StopAsyncIteration):
            down = None
        except grpc.aio.AioRpcError as e:
            if e.code() not in _GONE:
                raise _refusal(e, member.id) from None
            down = None
        if down is None:
            raise ExoError(
                "peer_unreachable",
                f"node {member.id} did not answer at {target} within {timeout:g}s "
                "(EXOD_PEER_TIMEOUT) when asked to run its rank: check that node, then retry",
            )
        self._note(link, down)
        if link.state == "ended":
            raise ExoError(
                down.state.reason or "rank_failed",
                f"node {member.id} refused rank {link.rank.rank}: {down.state.message}",
            )

    async def _up(
        self, instance: Instance, start: peer_pb2.RankStart
    ) -> AsyncIterator[peer_pb2.RankUp]:
        """The lease, as the member reads it: start, then a heartbeat every third of
        EXOD_PEER_TIMEOUT until the instance ends."""
        yield peer_pb2.RankUp(protocol_version=PROTOCOL_VERSION, start=start)
        beat = peer_pb2.PeerHeartbeat(name=self._settings.node_name)
        while not instance.ending.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(instance.ending.wait(), self._settings.peer_timeout / 3)
            if not instance.ending.is_set():
                yield peer_pb2.RankUp(heartbeat=beat)

    async def _read(self, link: Link, timeout: float) -> peer_pb2.RankDown | None:  # noqa: ASYNC109  # EXOD_PEER_TIMEOUT
        """The member's next message; None when the stream ended, failed or stayed silent."""
        if link.replies is None:
            return None
        try:
            return await asyncio.wait_for(anext(link.replies), timeout)
        except (TimeoutError, StopAsyncIteration, grpc.aio.AioRpcError):
            return None

    def _note(self, link: Link, down: peer_pb2.RankDown) -> None:
        if down.WhichOneof("msg") == "state":
            link.state = down.state.state
            link.runner_id = down.state.runner_id or link.runner_id

    # --- watching and ending ----------------------------------------------------------------------

    async def _watch_link(self, instance: Instance, link: Link) -> None:
        timeout = self._settings.peer_timeout
        while not instance.ending.is_set():
            down = await self._read(link, timeout)
            if instance.ending.is_set():
                return
            if down is None:
                await self._end(
                    instance,
                    "peer_unreachable",
                    f"node {link.member.id} (rank {link.rank.rank}) went silent for "
                    f"{timeout:g}s (EXOD_PEER_TIMEOUT) or hung up: every rank was ended",
                )
                return
            self._note(link, down)
            if link.state == "ended":
                await self._end(
                    instance,
                    "rank_failed",
                    f"rank {link.rank.rank} on node {link.member.id} ended "
                    f"({down.state.reason}: {down.state.message}): every rank was ended",
                )
                return

    async def _watch_rank0(self, instance: Instance) -> None:
        runner = instance.runner
        if runner is None:
            return
        await runner.ended.wait()
        reason = runner.load_error.reason if runner.load_error else (runner.ending or "rank_failed")
        await self._end(instance, reason, f"rank 0's runner {runner.id} ended ({reason})")

    async def _end(self, instance: Instance, reason: str, message: str) -> None:
        """End every rank of the instance (once; the first reason wins)."""
        if instance.ending.is_set():
            return
        instance.ending.set()
        instance.state = "ended"
        instance.reason, instance.message = reason, message
        log.warning("instance %s ends: %s", instance.id, message)
        runner = instance.runner
        if runner is not None and not runner.ended.is_set():
            stop_reason = reason if reason in _STOP_REASONS else "rank_failed"
            self._supervisor.stop_soon(runner, stop_reason, message)
        for link in instance.links:
            if link.call is not None:
                link.call.cancel()  # the member sees its lease end at once
            if link.channel is not None:
                await link.channel.close(grace=None)
        try:
            self._journal.append(
                events_pb2.Event(
                    instance_ended=events_pb2.InstanceEnded(
                        instance_id=instance.id, reason=reason, message=message
                    )
                )
            )
        except StoreError:
            log.exception("could not record the end of instance %s", instance.id)
        self.instances.pop(instance.id, None)
        current = asyncio.current_task()
        for task in instance.tasks:
            if task is not current:
                task.cancel()

    async def kill(self, instance_id: str) -> None:
        instance = self.instances.get(instance_id)
        if instance is None:
            raise ExoError("runner_not_found", f"no instance {instance_id} is running")
        await self._end(instance, "killed", f"instance {instance_id} was killed (exoctl kill)")
        if instance.runner is not None:
            await instance.runner.ended.wait()

    async def shutdown(self) -> None:
        for instance in list(self.instances.values()):
            await self._end(instance, "daemon_stopped", "exod is shutting down")

    def _log_placed(self, instance: Instance) -> None:
        placed = events_pb2.InstancePlaced(instance_id=instance.id, model=instance.model)
        for r in instance.ranks:
            placed.ranks.add(
                rank=r.rank, node_id=r.node, first_layer=r.first_layer, last_layer=r.last_layer
            )
        self._journal.append(events_pb2.Event(instance_placed=placed))

    def view(self) -> list[control_pb2.InstanceInfo]:
        """What `exoctl status` lists of the instances this node coordinates."""
        out = []
        for instance in self.instances.values():
            info = control_pb2.InstanceInfo(
                id=instance.id,
                model=instance.model,
                state=instance.state,
                coordinator=self._id,
            )
            runner = instance.runner
            if runner is not None:
                info.ranks.add(
                    rank=0,
                    node=self._id,
                    runner=runner.id,
                    first_layer=instance.ranks[0].first_layer,
                    last_layer=instance.ranks[0].last_layer,
                    state=runner.state,
                )
            for link in instance.links:
                info.ranks.add(
                    rank=link.rank.rank,
                    node=link.member.id,
                    runner=link.runner_id,
                    first_layer=link.rank.first_layer,
                    last_layer=link.rank.last_layer,
                    state=link.state,
                    weights_sent=link.sent,
                    weights_total=link.total,
                )
            out.append(info)
        return out

    # --- runs on a rank 0 elsewhere ---------------------------------------------------------------

    def lead_elsewhere(self, model_path: str) -> Target | None:
        """Rank 0 (or the whole model) on a member of the instance that runs `model_path`;
        None when no instance runs it that way."""
        for instance in self.instances.values():
            if instance.model_path != model_path or instance.runner is not None:
                continue
            lead = next((k for k in instance.links if k.rank.rank == 0), None)
            if lead is not None and not instance.ending.is_set():
                return Target(
                    lead.member,
                    instance_id=instance.id,
                    channel=lead.channel,
                    ended=functools.partial(_end_of, instance),
                )
        return None


def _end_of(instance: Instance) -> ExoError | None:
    """Why the instance ended, once it has: what its runs fail with."""
    if not instance.ending.is_set():
        return None
    return ExoError(instance.reason or "rank_failed", instance.message)


_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def _refusal(e: grpc.aio.AioRpcError, member: str) -> ExoError:
    """A member's refusal of its rank, as it gave it."""
    return from_peer(
        e,
        f"node {member} failed to start its rank",
        refused=f"node {member} refused its rank: {e.details()}",
        unimplemented=f"node {member} runs an earlier exod that cannot run a rank of a split "
        "model: upgrade exod there, or leave it out of --on",
    )


# Reasons rank 0's runner may be stopped for (exod/errors.py): anything else is rank_failed.
_STOP_REASONS = frozenset({"rank_failed", "peer_unreachable", "killed", "daemon_stopped"})


def _ranks_here(plan: Plan, node_id: str) -> tuple[Rank, ...]:
    """The ranks of an instance coordinated here: every rank of a split, or the one rank of a
    model whole on another member; () when the model runs whole here. ExoError for a refused
    plan, and for a split where this node takes part other than as rank 0 (its runs start on
    rank 0, which this node coordinates from here or from outside the ring)."""
    if plan.refused is not None:
        raise ExoError(plan.refused.reason, plan.refused.message)
    if plan.whole_on == node_id:
        return ()
    if any(r.node == node_id for r in plan.ranks[1:]):
        raise ExoError(
            "invalid_argument",
            f"this node ({node_id}) takes part in a split only as rank 0: put it first in "
            "--on, or leave it out",
        )
    return plan.ranks


def _split(ranks: tuple[Rank, ...]) -> list[int]:
    return [r.last_layer - r.first_layer + 1 for r in ranks]


def _rank_message(
    rank: Rank, ranks: tuple[Rank, ...], hosts: list[str], ring_timeout: float
) -> runner_pb2.Rank:
    return runner_pb2.Rank(
        rank=rank.rank,
        size=len(ranks),
        split=_split(ranks),
        hosts=hosts,
        ring_timeout_s=ring_timeout,
    )
