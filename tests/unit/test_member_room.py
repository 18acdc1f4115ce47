"""A member's room for placement: its reserve and runner cap travel with its free memory (Hello
and the heartbeat), and a peer from before those fields (it sends 0) counts as no reserve and no
cap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

from exod.cluster.peer_server import PeerService
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.cluster.replication import Link, Replication
from exod.eventlog import EventStore, replay
from exod.journal import Journal
from exod.proto.exo.v1 import events_pb2, peer_pb2

ME, PEER = "n-me", "n-peer"
GIB = 1 << 30


async def _no_join(request: peer_pb2.JoinRequest) -> peer_pb2.JoinReply:
    raise AssertionError("not called")


def _journal(tmp_path: Path) -> tuple[EventStore, Journal]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = EventStore(tmp_path / "exod.db", ME)
    return store, Journal(store, replay(store), snapshot_every=500)


def test_hello_and_heartbeat_carry_the_reserve_and_the_cap(tmp_path: Path) -> None:
    async def scenario() -> tuple[peer_pb2.PeerHelloReply, peer_pb2.FollowReply]:
        store, journal = _journal(tmp_path)
        service = PeerService(
            ME,
            "me",
            _no_join,
            journal=journal,
            members=list,
            heartbeat_s=0.05,
            reserved=2 * GIB,
            runner_cap=6 * GIB,
        )
        context = cast("Any", None)  # used only to refuse, which these requests are not
        hello = await service.Hello(
            peer_pb2.PeerHelloRequest(protocol_version=PROTOCOL_VERSION, node_id=PEER), context
        )
        follow = peer_pb2.FollowRequest(protocol_version=PROTOCOL_VERSION, origin=ME)
        # An async generator at run time (the stubs say AsyncIterator): closed when done.
        stream = cast("AsyncGenerator[peer_pb2.FollowReply, None]", service.Follow(follow, context))
        beat = await anext(stream)
        await stream.aclose()
        store.close()
        return hello, beat

    hello, beat = asyncio.run(scenario())
    assert (hello.memory_reserved_bytes, hello.runner_memory_cap_bytes) == (2 * GIB, 6 * GIB)
    assert hello.memory_free_bytes > 0
    assert beat.HasField("heartbeat")
    assert beat.heartbeat.memory_reserved_bytes == 2 * GIB
    assert beat.heartbeat.runner_memory_cap_bytes == 6 * GIB


class _Stub:
    def __init__(self, reply: peer_pb2.PeerHelloReply) -> None:
        self.reply = reply

    async def Hello(  # gRPC method names are CamelCase
        self, request: peer_pb2.PeerHelloRequest, **options: object
    ) -> peer_pb2.PeerHelloReply:
        return self.reply


def _room_after_hello(tmp_path: Path, reply: peer_pb2.PeerHelloReply) -> int:
    async def scenario() -> int:
        store, journal = _journal(tmp_path)
        known = events_pb2.KnownMember(node_id=PEER, name="b", addresses=["10.0.0.3"], port=9)
        journal.append(events_pb2.Event(members_learned=events_pb2.MembersLearned(members=[known])))
        replication = Replication(ME, journal, peer_timeout=2.0)
        link = Link(PEER)
        replication._links[PEER] = link
        await replication._hello(cast("Any", _Stub(reply)), link)
        store.close()
        return replication.room(PEER)

    return asyncio.run(scenario())


def test_room_is_free_less_reserve_at_most_the_cap(tmp_path: Path) -> None:
    reply = peer_pb2.PeerHelloReply(
        protocol_version=PROTOCOL_VERSION,
        node_id=PEER,
        memory_free_bytes=10 * GIB,
        memory_total_bytes=16 * GIB,
        memory_reserved_bytes=GIB,
        runner_memory_cap_bytes=6 * GIB,
    )
    assert _room_after_hello(tmp_path, reply) == 6 * GIB
    reply.runner_memory_cap_bytes = 12 * GIB
    assert _room_after_hello(tmp_path / "again", reply) == 9 * GIB


def test_a_peer_before_the_fields_counts_no_reserve_and_no_cap(tmp_path: Path) -> None:
    # Protocol 1.0 and 1.1 send neither field: they read as 0.
    reply = peer_pb2.PeerHelloReply(
        protocol_version="1.0", node_id=PEER, memory_free_bytes=10 * GIB, memory_total_bytes=GIB
    )
    assert _room_after_hello(tmp_path, reply) == 10 * GIB


def test_a_member_never_heard_from_has_no_room(tmp_path: Path) -> None:
    store, journal = _journal(tmp_path)
    assert Replication(ME, journal, peer_timeout=2.0).room(PEER) == 0
    store.close()
