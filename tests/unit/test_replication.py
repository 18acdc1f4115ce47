"""Replication's pure parts and its store: which kinds replicate, gap detection, liveness, the
fold keyed by origin, and keeping another node's records (idempotent; a conflict is seen)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, cast

import pytest

from exod.cluster.peer_server import PeerService
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.cluster.replicated import (
    REPLICATED_KINDS,
    Gap,
    backoff,
    check_next,
    liveness,
    replicates,
)
from exod.cluster.replication import Replication
from exod.eventlog import EventStore, OriginConflict, PeerView, Record, decode, encode, fold, replay
from exod.eventlog.records import kind_of
from exod.eventlog.store import RawRecord
from exod.journal import Journal
from exod.proto.exo.v1 import events_pb2 as pb
from exod.proto.exo.v1 import peer_pb2

ME, PEER = "n-me", "n-peer"


def spawned(runner_id: str) -> pb.Event:
    return pb.Event(
        runner_spawned=pb.RunnerSpawned(
            runner_id=runner_id, model="tiny", model_path="/theirs/tiny", pid=4242
        )
    )


def stopped(runner_id: str) -> pb.Event:
    return pb.Event(runner_stopped=pb.RunnerStopped(runner_id=runner_id, reason="killed"))


def failed(runner_id: str) -> pb.Event:
    return pb.Event(runner_failed=pb.RunnerFailed(runner_id=runner_id, reason="crashed"))


def model_added(name: str) -> pb.Event:
    return pb.Event(model_added=pb.ModelAdded(name=name, path="/theirs/m", content_hash="h"))


def joined(node_id: str) -> pb.Event:
    return pb.Event(
        node_joined=pb.NodeJoined(node_id=node_id, name=node_id, addresses=["10.0.0.9"], port=9)
    )


def rec(seq: int, origin: str, origin_seq: int, event: pb.Event) -> Record:
    return Record(seq, origin, origin_seq, 100.0 + seq, kind_of(event), event)


# ---- which kinds ----


def test_lifecycle_and_membership_replicate_per_run_and_local_facts_do_not() -> None:
    for kind in ("NodeStarted", "NodeStopped", "RunnerSpawned", "RunnerReady", "RunnerFailed"):
        assert replicates(kind)
    for kind in ("RunnerStopped", "ClusterEntered", "NodeJoined"):
        assert replicates(kind)
    for kind in ("RunAccepted", "RunFinished", "ModelAdded", "ModelRemoved", "InviteIssued"):
        assert not replicates(kind)
    assert not replicates("MembersLearned") and not replicates("SomethingNewer")


def test_every_replicated_kind_is_an_event_of_the_schema() -> None:
    fields = pb.Event.DESCRIPTOR.oneofs_by_name["kind"].fields
    kinds = {f.message_type.name for f in fields if f.message_type is not None}
    assert kinds >= REPLICATED_KINDS


# ---- gaps ----


def test_the_next_event_follows_what_is_held() -> None:
    check_next(held=0, prev=0, origin_seq=1)
    check_next(held=4, prev=4, origin_seq=9)  # 5..8 are local kinds of the origin


def test_a_missed_event_is_a_gap() -> None:
    with pytest.raises(Gap):
        check_next(held=4, prev=6, origin_seq=9)


def test_an_event_sent_again_is_a_gap() -> None:
    with pytest.raises(Gap):
        check_next(held=9, prev=4, origin_seq=9)
    with pytest.raises(Gap):
        check_next(held=9, prev=9, origin_seq=9)


# ---- liveness and backoff ----


def test_alive_within_the_timeout_unreachable_beyond_it_or_before_any_message() -> None:
    assert liveness(100.0, now=101.9, timeout=2.0) == "alive"
    assert liveness(100.0, now=102.0, timeout=2.0) == "alive"
    assert liveness(100.0, now=102.1, timeout=2.0) == "unreachable"
    assert liveness(None, now=0.0, timeout=2.0) == "unreachable"


def test_backoff_doubles_from_a_quarter_second_up_to_five() -> None:
    assert [backoff(i) for i in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff(10_000) == 5.0


# ---- the fold keyed by origin ----


def test_a_peers_runners_and_models_never_become_this_nodes() -> None:
    state = fold(
        [
            rec(1, PEER, 1, spawned("r-theirs")),
            rec(2, PEER, 3, model_added("theirs")),
            rec(3, ME, 1, spawned("r-mine")),
            rec(4, PEER, 4, spawned("r-gone")),
            rec(5, PEER, 5, stopped("r-gone")),
        ],
        own=ME,
    )
    assert set(state.runners) == {"r-mine"}
    assert state.models == {}
    assert state.peers == {PEER: PeerView(id=PEER, held=5, runners=("r-theirs",))}
    assert state.last_seq == 5
    after = fold([rec(6, PEER, 7, failed("r-theirs"))], state, own=ME)
    assert after.peers[PEER].runners == () and after.peers[PEER].held == 7


def test_a_member_joined_on_the_ca_node_becomes_known_but_this_node_is_not_its_own_member() -> None:
    state = fold([rec(1, PEER, 1, joined("n-c")), rec(2, PEER, 2, joined(ME))], own=ME)
    assert set(state.members) == {"n-c"}


def test_members_learned_are_kept_without_this_node() -> None:
    learned = pb.Event(
        members_learned=pb.MembersLearned(
            members=[
                pb.KnownMember(node_id="n-a", name="a", addresses=["10.0.0.1"], port=1),
                pb.KnownMember(node_id=ME, name="me", addresses=["10.0.0.2"], port=2),
            ]
        )
    )
    state = fold([rec(1, ME, 1, learned)], own=ME)
    assert set(state.members) == {"n-a"}
    assert state.members["n-a"].addresses == ("10.0.0.1",)


def test_without_a_node_id_every_record_is_the_nodes_own() -> None:
    assert set(fold([rec(1, PEER, 1, spawned("r1"))]).runners) == {"r1"}


def test_a_snapshot_keeps_the_last_origin_seq_held_per_origin() -> None:
    state = fold([rec(1, PEER, 8, spawned("r1"))], own=ME)
    again = decode(encode(state))
    assert again == state
    assert again.peers[PEER].held == 8


# ---- the store ----


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore(tmp_path / "exod.db", ME)
    yield s
    s.close()


def raw(origin: str, origin_seq: int, event: pb.Event, ts: float = 1.0) -> RawRecord:
    return RawRecord(origin, origin_seq, ts, kind_of(event), event.SerializeToString())


def test_a_record_of_another_origin_keeps_its_number_time_and_payload(store: EventStore) -> None:
    (record,) = store.append_foreign([raw(PEER, 7, spawned("r1"), ts=123.5)])
    assert record == Record(1, PEER, 7, 123.5, "RunnerSpawned", spawned("r1"))
    assert store.read() == [record]
    assert store.held(PEER) == 7 and store.held(ME) == 0
    # The node's own events still count from 1: another origin's numbers are its own.
    assert store.append(spawned("r2")).origin_seq == 1
    assert store.held_by_origin() == {PEER: 7, ME: 1}
    assert store.pragmas()["synchronous"] == 2  # FULL again for this node's own events
    assert store.payload_at(PEER, 7) == spawned("r1").SerializeToString()
    assert store.payload_at(PEER, 8) is None


def test_the_same_record_again_is_a_no_op(store: EventStore) -> None:
    assert len(store.append_foreign([raw(PEER, 1, spawned("r1"))])) == 1
    kept = store.append_foreign([raw(PEER, 1, spawned("r1")), raw(PEER, 2, stopped("r1"))])
    assert [r.origin_seq for r in kept] == [2]
    assert store.count() == 2


def test_a_known_number_with_another_payload_is_a_conflict_and_keeps_nothing(
    store: EventStore,
) -> None:
    store.append_foreign([raw(PEER, 1, spawned("r1"))])
    with pytest.raises(OriginConflict, match=f"event 1 of {PEER}"):
        store.append_foreign([raw(PEER, 1, spawned("r9")), raw(PEER, 2, stopped("r9"))])
    assert store.count() == 1


def test_a_peer_cannot_write_under_this_nodes_id(store: EventStore) -> None:
    with pytest.raises(OriginConflict):
        store.append_foreign([raw(ME, 1, spawned("r1"))])


def test_read_by_origin_from_an_origin_seq_only_the_kinds_asked(store: EventStore) -> None:
    store.append(spawned("r1"))  # 1
    store.append(model_added("m"))  # 2: local only
    store.append(stopped("r1"))  # 3
    store.append_foreign([raw(PEER, 1, spawned("x"))])
    kinds = REPLICATED_KINDS
    assert [r.origin_seq for r in store.read_origin(ME, 0, kinds, 10)] == [1, 3]
    assert store.read_origin(ME, 0, kinds, 10)[0].payload == spawned("r1").SerializeToString()
    assert [r.origin_seq for r in store.read_origin(ME, 1, kinds, 10)] == [3]
    assert [r.origin_seq for r in store.read_origin(ME, 0, kinds, 1)] == [1]
    assert store.last_of_kinds(ME, 2, kinds) == 1
    assert store.last_of_kinds(ME, 0, kinds) == 0
    assert [r.origin for r in store.read_of(PEER)] == [PEER]


# ---- the members' view ----


def test_a_member_never_heard_from_is_unreachable_with_its_replicated_runners(
    tmp_path: Path,
) -> None:
    store = EventStore(tmp_path / "exod.db", ME)
    try:
        journal = Journal(store, replay(store), snapshot_every=500)
        member = pb.KnownMember(node_id=PEER, name="laptop", addresses=["10.0.0.3"], port=9)
        journal.append(pb.Event(members_learned=pb.MembersLearned(members=[member])))
        journal.append_foreign([raw(PEER, 3, spawned("r1")), raw(PEER, 4, spawned("r2"))])
        (node,) = Replication(ME, journal, peer_timeout=2.0).nodes(now=1000.0)
        assert (node.id, node.name, list(node.addresses)) == (PEER, "laptop", ["10.0.0.3"])
        assert (node.state, node.reason, node.runners) == ("unreachable", "", 2)
        assert not node.HasField("last_seen") and node.memory_total_bytes == 0
        # Its runners are its own: none of them is this node's.
        assert journal.state.runners == {}
    finally:
        store.close()


# ---- the sender ----


def test_follow_sends_the_last_held_again_then_new_ones_and_heartbeats_among_local_writes(
    tmp_path: Path,
) -> None:
    """A busy node writes local events only (runs) all the time: its followers still get a
    heartbeat within the interval, so they never take it for gone."""

    async def scenario() -> list[peer_pb2.FollowReply]:
        store = EventStore(tmp_path / "exod.db", ME)
        journal = Journal(store, replay(store), snapshot_every=500)
        for i in range(3):
            journal.append(spawned(f"r{i}"))  # origin_seq 1..3
        service = PeerService(ME, "me", _no_join, journal=journal, members=list, heartbeat_s=0.3)
        request = peer_pb2.FollowRequest(
            protocol_version=PROTOCOL_VERSION, origin=ME, after_origin_seq=2
        )
        context = cast("Any", None)  # used only to refuse, which this request is not
        replies: list[peer_pb2.FollowReply] = []

        async def follow() -> None:
            async for reply in service.Follow(request, context):
                replies.append(reply)

        task = asyncio.create_task(follow())
        for i in range(10):  # 1 s of local-only events, one every 0.1 s
            await asyncio.sleep(0.1)
            journal.append(pb.Event(run_accepted=pb.RunAccepted(run_id=f"run{i}")))
        journal.append(stopped("r0"))  # origin_seq 14: replicated
        await asyncio.sleep(0.1)
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        store.close()
        return replies

    replies = asyncio.run(scenario())
    events = [e for r in replies if r.HasField("events") for e in r.events.events]
    assert [(e.origin_seq, e.prev_origin_seq, e.kind) for e in events] == [
        (3, 2, "RunnerSpawned"),  # the last one the follower holds, again, to be compared
        (14, 3, "RunnerStopped"),
    ]
    beats = [r for r in replies if r.HasField("heartbeat")]
    assert len(beats) >= 2, replies
    assert beats[0].heartbeat.memory_total_bytes > 0


async def _no_join(request: peer_pb2.JoinRequest) -> peer_pb2.JoinReply:
    raise AssertionError("not called")
