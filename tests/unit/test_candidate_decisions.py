"""What exod does with a node mDNS found: decide (pure), where a member is tried (targets), and
Replication's memory of it (refused candidates in `status`, until their goodbye; a candidate
that is no member is never followed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exod.cluster.candidates import Act, Candidate, Decision, Me, decide
from exod.cluster.replication import Replication, targets
from exod.eventlog import EventStore, replay
from exod.journal import Journal
from exod.proto.exo.v1 import events_pb2 as pb

ME = Me(node_id="n-me", cluster_id="c-ours", proto="1.0")
MEMBERS = {"n-b"}


def candidate(
    node_id: str = "n-b",
    cluster_id: str = "c-ours",
    proto: str = "1.0",
    *,
    addresses: tuple[str, ...] = ("10.0.0.2",),
    port: int = 52416,
    own: bool = False,
    name: str = "",
) -> Candidate:
    return Candidate(
        node_id=node_id,
        cluster_id=cluster_id,
        proto=proto,
        addresses=addresses,
        port=port,
        name=name or f"{node_id}._exod._tcp.local.",
        own=own,
    )


@pytest.mark.parametrize(
    ("found", "decision"),
    [
        (candidate(own=True, node_id="n-me"), Decision(Act.IGNORE)),
        (candidate(), Decision(Act.FOLLOW)),
        (candidate(proto="1.7"), Decision(Act.FOLLOW)),  # a minor apart: still a member
        (candidate(node_id="n-new"), Decision(Act.REMEMBER)),  # no NodeJoined for it yet
        (candidate(cluster_id="c-theirs"), Decision(Act.REFUSE, "other_cluster")),
        # Another cluster's node is refused as such even if it reuses a member's id.
        (candidate(cluster_id="c-theirs", node_id="n-me"), Decision(Act.REFUSE, "other_cluster")),
        (candidate(proto="2.0"), Decision(Act.REFUSE, "protocol")),
        (candidate(node_id="n-me"), Decision(Act.REFUSE, "duplicate_id")),
    ],
)
def test_decide(found: Candidate, decision: Decision) -> None:
    assert decide(found, ME, MEMBERS) == decision


def test_targets_put_what_mdns_heard_first_each_once_and_skip_what_is_no_address() -> None:
    heard = [candidate(addresses=("10.0.0.9", "10.0.0.2", "not-an-ip"), port=6000)]
    assert targets(heard, ("10.0.0.2", "10.0.0.9", "::1"), 52416) == [
        ("10.0.0.9", 6000),
        ("10.0.0.2", 6000),
        ("10.0.0.2", 52416),
        ("10.0.0.9", 52416),
        ("::1", 52416),
    ]
    assert targets([], (), 52416) == []
    assert targets([], ("10.0.0.2",), 0) == []  # no port recorded: nowhere to call


def test_refused_candidates_are_listed_until_they_leave_and_others_are_not_followed(
    tmp_path: Path,
) -> None:
    store = EventStore(tmp_path / "exod.db", ME.node_id)
    try:
        journal = Journal(store, replay(store), snapshot_every=500)
        member = pb.KnownMember(node_id="n-b", name="b", addresses=["10.0.0.3"], port=52416)
        journal.append(pb.Event(members_learned=pb.MembersLearned(members=[member])))
        replication = Replication(ME.node_id, journal, peer_timeout=2.0)
        other = candidate(node_id="n-d", cluster_id="c-theirs", addresses=("10.0.0.4",))
        copy = candidate(node_id="n-me", name="n-me (2)._exod._tcp.local.")
        stranger = candidate(node_id="n-new")
        assert replication.seen(other, ME) is Act.REFUSE
        assert replication.seen(copy, ME) is Act.REFUSE
        # Not started (no TLS material): a member is remembered, and followed only once started.
        assert replication.seen(candidate(), ME) is Act.FOLLOW
        assert replication.seen(stranger, ME) is Act.REMEMBER
        listed = replication.nodes(now=1000.0)
        assert [(n.id, n.state, n.reason, list(n.addresses)) for n in listed] == [
            ("n-b", "unreachable", "", ["10.0.0.3"]),
            ("n-d", "refused", "other_cluster", ["10.0.0.4"]),
            ("n-me", "refused", "duplicate_id", ["10.0.0.2"]),
        ]
        assert all(n.HasField("last_seen") for n in listed[1:])
        replication.gone(other)
        # The same service name announcing again with new records replaces what it said.
        replication.seen(candidate(node_id="n-me", name=copy.name, proto="2.0"), ME)
        assert [(n.id, n.reason) for n in replication.nodes(now=1000.0)] == [
            ("n-b", ""),
            ("n-me", "protocol"),
        ]
        # Nothing of it is logged: a restart forgets it, and mDNS tells again.
        assert journal.state.last_seq == 1
    finally:
        store.close()
