"""Following every member's event log: one task per member, over mutual TLS.

Each follower connects to its member's peer port (the certificate must name that member's id),
says Hello (which reports the member's memory and the members it knows, and how much of this
node's own stream it holds), then calls Follow from the last origin_seq this log holds of it and
keeps every replicated event it receives in this node's log, folded into the state under the
member's origin. A broken link is retried with a doubling, bounded backoff.

Liveness is derived here and never logged: a member is alive while a message (a Hello answer, an
event or a heartbeat) arrived within EXOD_PEER_TIMEOUT. A Follow stream that stays silent that
long is hung up on, so a cut link or a stopped machine is noticed within the timeout whatever
TCP does.

mDNS (exod.cluster.finder) adds what the LAN says now: a member is also tried at the addresses
it announces (a DHCP lease changed, or the log has none for it), and a node refused by
candidates.decide is listed as `refused` until it says goodbye. Neither is logged: a candidate
is a claim by anyone on the LAN until the follower's mTLS proves it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field

import grpc

from exod.cluster import tls_store
from exod.cluster.candidates import Act, Candidate, Me, decide
from exod.cluster.peer_server import endpoint, peer_channel
from exod.cluster.placement import usable_memory
from exod.cluster.protocol import PROTOCOL_VERSION, check_version
from exod.cluster.replicated import Gap, backoff, check_next, liveness
from exod.errors import ExoError
from exod.eventlog import OriginConflict, StoreError
from exod.eventlog.store import RawRecord
from exod.journal import Journal
from exod.proto.exo.v1 import control_pb2, events_pb2, peer_pb2, peer_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class Link:
    """What this node knows, live, of one member (never logged)."""

    member_id: str
    last_seen: float | None = None  # unix seconds of the last message from it
    name: str = ""
    memory_free: int = 0
    memory_total: int = 0
    # Its EXOD_RESERVED_MEMORY and EXOD_MAX_RUNNER_MEMORY as it reports them (0: a peer from
    # before they were sent, so none known): what placement may count on there.
    memory_reserved: int = 0
    runner_cap: int = 0
    refused: str = ""  # why its stream is no longer followed (duplicate_id); "" while followed
    task: asyncio.Task[None] | None = None
    # Set when mDNS reports a new address: a follower waiting to retry tries it at once.
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Refusal:
    """A node mDNS reported that this node will not take as a member (in memory only)."""

    candidate: Candidate
    reason: str  # as `status` shows it: other_cluster, protocol, duplicate_id
    seen: float  # unix seconds


def targets(
    heard: Iterable[Candidate], addresses: Iterable[str], port: int
) -> list[tuple[str, int]]:
    """Where to reach a member, in the order to try: what mDNS heard it announce (the LAN as it
    is now) before the addresses its log records, each once; addresses that are not IP
    addresses (nothing exod wrote) are left out."""
    found: dict[tuple[str, int], None] = {}
    pairs = [(a, c.port) for c in heard for a in c.addresses]
    for address, at in [*pairs, *((a, port) for a in addresses)]:
        try:
            endpoint(address, at)
        except ValueError:
            continue
        if at > 0:
            found.setdefault((address, at), None)
    return list(found)


# How long stopping waits for the followers to end after cancelling them.
STOP_WAIT_S = 5.0


class Replication:
    def __init__(self, node_id: str, journal: Journal, peer_timeout: float) -> None:
        self._id = node_id
        self._journal = journal
        self._timeout = peer_timeout
        self._links: dict[str, Link] = {}
        self._material: tls_store.Material | None = None
        self._watch: asyncio.Task[None] | None = None
        self._heard: dict[str, Candidate] = {}  # this cluster's nodes mDNS saw, by service name
        self._refusals: dict[str, Refusal] = {}  # by service name
        # Set when a member holds more of this node's own stream than this log does: its home
        # was copied or restored from a backup. Shown as a warning by `exoctl status`.
        self.forked: str = ""

    def start(self, material: tls_store.Material) -> None:
        """Follow every member known now, and each one that becomes known later."""
        self._material = material
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_members())

    async def stop(self) -> None:
        """Stop following (exod stops, or this node left its cluster) and forget what mDNS
        reported; bounded, so that a follower stuck in a gRPC call cannot hold up exod's stop."""
        tasks = [t for t in (self._watch, *(link.task for link in self._links.values())) if t]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            if stuck:
                log.warning("%d follower(s) did not stop within %ss", len(stuck), STOP_WAIT_S)
        self._watch = None
        self._heard.clear()
        self._refusals.clear()

    def nodes(self, now: float) -> list[control_pb2.NodeInfo]:
        """Every member this node knows, as `exoctl status` shows them, sorted by id."""
        state = self._journal.state
        found = []
        for member in sorted(state.members.values(), key=lambda m: m.id):
            if member.id == self._id:
                continue
            link = self._links.get(member.id) or Link(member.id)
            peer = state.peers.get(member.id)
            info = control_pb2.NodeInfo(
                id=member.id,
                name=link.name or member.name,
                addresses=member.addresses,
                state="removed"
                if member.removed
                else "refused"
                if link.refused
                else liveness(link.last_seen, now, self._timeout),
                reason=link.refused,
                memory_free_bytes=link.memory_free,
                memory_total_bytes=link.memory_total,
                runners=len(peer.runners) if peer is not None else 0,
            )
            if link.last_seen is not None:
                info.last_seen.FromNanoseconds(int(link.last_seen * 1e9))
            found.append(info)
        for refusal in sorted(self._refusals.values(), key=lambda r: r.candidate.node_id):
            c = refusal.candidate
            info = control_pb2.NodeInfo(
                id=c.node_id, addresses=c.addresses, state="refused", reason=refusal.reason
            )
            info.last_seen.FromNanoseconds(int(refusal.seen * 1e9))
            found.append(info)
        return found

    def room(self, member_id: str) -> int:
        """What one runner on `member_id` may take, as it last reported (0 if never heard)."""
        link = self._links.get(member_id)
        if link is None:
            return 0
        return usable_memory(link.memory_free, link.memory_reserved, link.runner_cap)

    # --- what mDNS reports --------------------------------------------------------------------

    def seen(self, candidate: Candidate, me: Me) -> Act:
        """mDNS resolved `candidate` (again, or with new records): remember, follow or refuse
        it as candidates.decide says; what was done."""
        self.gone(candidate)
        decision = decide(candidate, me, self._journal.state.members)
        if decision.act is Act.REFUSE:
            self._refusals[candidate.name] = Refusal(candidate, decision.reason, time.time())
        elif decision.act is not Act.IGNORE:
            self._heard[candidate.name] = candidate
        if decision.act is Act.FOLLOW:
            self._kick(candidate.node_id)
        return decision.act

    def gone(self, candidate: Candidate) -> None:
        """mDNS says `candidate` left: forget what it announced."""
        self._heard.pop(candidate.name, None)
        self._refusals.pop(candidate.name, None)

    def _kick(self, member_id: str) -> None:
        """Try `member_id` now: start its follower if none runs, else end its wait."""
        link = self._links.get(member_id)
        if link is None or link.refused or self._material is None:
            return  # the watch starts it (with what was heard) once started and it is known
        if link.task is None or link.task.done():
            link.task = asyncio.create_task(self._follow(link))
        else:
            link.wake.set()

    # --- members ----------------------------------------------------------------------------------

    async def _watch_members(self) -> None:
        while True:
            seen = self._journal.state.last_seq
            for member in list(self._journal.state.members.values()):
                if member.id == self._id:
                    continue
                link = self._links.setdefault(member.id, Link(member.id, name=member.name))
                if member.removed:  # its calls are refused anyway: stop asking it
                    if link.task is not None:
                        link.task.cancel()
                    continue
                # A follower ends only when it had no address to try, or was refused; a
                # member's new addresses (learned since) are worth another try.
                if not link.refused and (link.task is None or link.task.done()):
                    link.task = asyncio.create_task(self._follow(link))
            await self._journal.wait_beyond(seen)

    def _learn(self, members: list[peer_pb2.Member]) -> None:
        known = self._journal.state.members
        new = [
            events_pb2.KnownMember(
                node_id=m.id, name=m.name, addresses=m.addresses[:4], port=m.port
            )
            for m in members
            if m.id and m.id != self._id and m.id not in known and m.port > 0
        ]
        if new:
            # Logged (locally) so that a restart finds them without asking anyone.
            learned = events_pb2.MembersLearned(members=new)
            self._journal.append(events_pb2.Event(members_learned=learned))

    # --- one member -------------------------------------------------------------------------------

    async def _follow(self, link: Link) -> None:
        attempt = 0
        while True:
            member = self._journal.state.members.get(link.member_id)
            material = self._material
            if member is None or material is None or member.removed:
                return
            heard = [c for c in self._heard.values() if c.node_id == member.id]
            where = targets(heard, member.addresses, member.port)
            if not where:
                return  # nowhere to reach it (yet): mDNS or a Hello may tell later
            address, port = where[attempt % len(where)]
            target = endpoint(address, port)
            link.wake.clear()
            try:
                async with peer_channel(material, member.id, target) as ch:
                    stub = peer_pb2_grpc.PeerStub(ch)
                    await self._hello(stub, link)
                    attempt = 0
                    await self._stream(stub, link)
            except OriginConflict as e:
                link.refused = "duplicate_id"
                log.error("no longer following %s: %s", link.member_id, e)
                return
            except (grpc.aio.AioRpcError, Gap, TimeoutError, StoreError, ExoError) as e:
                log.info("link to %s (%s) broke: %s", link.member_id, target, _why(e))
            except Exception:
                # Whatever a peer sends must not end the following of it for good, nor exod.
                log.exception("following %s (%s) failed; retrying", link.member_id, target)
            # The backoff, cut short when mDNS reports where the member is now.
            with suppress(TimeoutError):
                await asyncio.wait_for(link.wake.wait(), backoff(attempt))
            attempt += 1

    async def _hello(self, stub: peer_pb2_grpc.PeerAsyncStub, link: Link) -> None:
        request = peer_pb2.PeerHelloRequest(
            protocol_version=PROTOCOL_VERSION, node_id=self._id, name=""
        )
        reply = await stub.Hello(request, timeout=self._timeout)
        check_version(reply.protocol_version, f"peer {link.member_id}")
        if reply.node_id != link.member_id:
            raise ExoError(
                "permission_denied", f"{link.member_id}'s address answers as {reply.node_id}"
            )
        held = await asyncio.to_thread(self._journal.store.held, link.member_id)
        if reply.own_origin_seq < held:
            # Its own log ends before what this node holds of it: its home went back in time
            # (restored from a backup, or copied from it), and its next events would fork.
            raise OriginConflict(
                f"{link.member_id} holds its own stream up to {reply.own_origin_seq}, this node "
                f"holds it up to {held}: its home was restored or copied"
            )
        link.last_seen = time.time()
        link.name = reply.name
        link.memory_free, link.memory_total = reply.memory_free_bytes, reply.memory_total_bytes
        link.memory_reserved, link.runner_cap = (
            reply.memory_reserved_bytes,
            reply.runner_memory_cap_bytes,
        )
        await self._check_own_stream(reply, link.member_id)
        self._learn(list(reply.members))

    async def _check_own_stream(self, reply: peer_pb2.PeerHelloReply, member_id: str) -> None:
        """Warn (once) when a member holds more of this node's own stream than this log, or
        another event under the same number: this home is a copy or a restored backup."""
        store = self._journal.store
        theirs = reply.caller_origin_seq
        mine = await asyncio.to_thread(store.held, self._id)
        ours = await asyncio.to_thread(store.payload_at, self._id, theirs) if theirs else None
        differs = ours is not None and hashlib.sha256(ours).digest() != reply.caller_last_digest
        if (theirs > mine or differs) and not self.forked:
            what = f"this log ends at {mine}" if theirs > mine else "this log holds another"
            self.forked = (
                f"member {member_id} holds event {theirs} of this node's own id {self._id}, "
                f"{what}: this home was copied or restored from a backup; stop exod, move "
                "EXOD_HOME aside and join the cluster again as a new node"
            )
            log.error("%s", self.forked)
            self._journal.fence(self.forked)

    async def _stream(self, stub: peer_pb2_grpc.PeerAsyncStub, link: Link) -> None:
        origin = link.member_id
        held = await asyncio.to_thread(self._journal.store.held, origin)
        # From the last one held: it comes again, and must be the same (else a copied home).
        request = peer_pb2.FollowRequest(
            protocol_version=PROTOCOL_VERSION, origin=origin, after_origin_seq=max(held - 1, 0)
        )
        call = stub.Follow(request)
        try:
            while True:
                # Silence beyond the timeout means the link is gone, whatever TCP thinks.
                reply = await asyncio.wait_for(call.read(), self._timeout)
                if not isinstance(reply, peer_pb2.FollowReply):
                    return  # grpc.aio.EOF: the member ended the stream (it is stopping)
                link.last_seen = time.time()
                if reply.HasField("heartbeat"):
                    beat = reply.heartbeat
                    link.name = beat.name or link.name
                    link.memory_free = beat.memory_free_bytes
                    link.memory_total = beat.memory_total_bytes
                    link.memory_reserved = beat.memory_reserved_bytes
                    link.runner_cap = beat.runner_memory_cap_bytes
                    continue
                batch = []
                for event in reply.events.events:
                    if event.origin != origin:
                        raise Gap(f"asked for {origin}'s events, got one of {event.origin!r}")
                    if event.origin_seq > held:
                        check_next(held, event.prev_origin_seq, event.origin_seq)
                        held = event.origin_seq
                    # One held already (the last, sent again) must be the same, else the store
                    # raises OriginConflict: two nodes write under that id.
                    batch.append(
                        RawRecord(origin, event.origin_seq, event.ts, event.kind, event.payload)
                    )
                self._journal.append_foreign(batch)
        finally:
            call.cancel()


def _why(e: Exception) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, TimeoutError):
        return "silent beyond EXOD_PEER_TIMEOUT"
    return str(e)
