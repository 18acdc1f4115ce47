"""The CA's node's side of `exoctl cluster remove`, and the `cert_expiring` warning, on a real
journal and real certificates (no sockets: nothing here listens)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exod.cluster import pki, revocation, tls_store
from exod.cluster.control import Cluster
from exod.config import load
from exod.errors import ExoError
from exod.eventlog import EventStore, replay
from exod.journal import Journal
from exod.proto.exo.v1 import events_pb2 as pb

ME, PEER = "n-00000000000a", "n-00000000000b"


def material(*, with_ca_key: bool, lifetime_s: int = 86400) -> tls_store.Material:
    now = time.time()
    ca_key, ca_cert = pki.new_ca("c-000000000001", 10 * 365 * 86400, now)
    key = pki.new_node_key()
    cert = pki.sign_node(ca_key, ca_cert, pki.csr_for(key, ME), ME, lifetime_s=lifetime_s, now=now)
    return tls_store.Material(
        ca_cert=ca_cert, node_key=key, node_cert=cert, ca_key=ca_key if with_ca_key else None
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    store = EventStore(tmp_path / "exod.db", ME)
    try:
        yield Journal(store, replay(store), snapshot_every=500)
    finally:
        store.close()


def cluster(tmp_path: Path, journal: Journal, m: tls_store.Material | None) -> Cluster:
    settings = load({}, {"EXOD_HOME": str(tmp_path)})
    if m is not None:
        entered = pb.ClusterEntered(
            cluster_id="c-000000000001", how="init", ca_node_id=ME, ca_cert=m.ca_cert
        )
        journal.append(pb.Event(cluster_entered=entered))
        joined = pb.NodeJoined(node_id=PEER, name="b", cert_fingerprint="ab" * 32, port=9)
        journal.append(pb.Event(node_joined=joined))
    return Cluster(settings, ME, journal, m)


def test_remove_writes_one_signed_entry_that_every_member_can_check(
    tmp_path: Path, journal: Journal
) -> None:
    m = material(with_ca_key=True)
    c = cluster(tmp_path, journal, m)
    reply = asyncio.run(c.remove(PEER))
    assert (reply.node_id, reply.cluster.id) == (PEER, "c-000000000001")
    asyncio.run(c.remove(PEER))  # again: nothing more is written
    entries = [r.event.node_removed for r in journal.store.read(0, 100) if r.kind == "NodeRemoved"]
    assert len(entries) == 1 and revocation.verified(m.ca_cert, entries[0])
    assert (entries[0].how, entries[0].cert_fingerprint) == ("remove", "ab" * 32)
    assert c.is_removed(PEER) and journal.state.members[PEER].removed
    assert not c.is_removed(ME)


@pytest.mark.parametrize(
    ("node", "ca_key", "reason", "words"),
    [
        ("n-000000000000", True, "node_not_found", "is not a member of this cluster"),
        (ME, True, "invalid_argument", "cannot remove itself"),
        # A member without the CA key asks the CA's node, whose address this journal lacks.
        (PEER, False, "peer_unreachable", f"knows no address of the CA's node {ME}"),
    ],
)
def test_remove_refusals(
    tmp_path: Path, journal: Journal, node: str, ca_key: bool, reason: str, words: str
) -> None:
    c = cluster(tmp_path, journal, material(with_ca_key=ca_key))
    with pytest.raises(ExoError) as caught:
        asyncio.run(c.remove(node))
    assert caught.value.reason == reason and words in caught.value.message
    assert not journal.state.removed


def test_outside_a_cluster_remove_and_leave_are_usage_errors(
    tmp_path: Path, journal: Journal
) -> None:
    c = cluster(tmp_path, journal, None)
    for call in (c.remove(PEER), c.leave()):
        with pytest.raises(ExoError) as caught:
            asyncio.run(call)
        assert caught.value.reason == "invalid_argument"
        assert "in no cluster" in caught.value.message


def test_the_ca_node_cannot_leave(tmp_path: Path, journal: Journal) -> None:
    c = cluster(tmp_path, journal, material(with_ca_key=True))
    with pytest.raises(ExoError) as caught:
        asyncio.run(c.leave())
    assert caught.value.reason == "invalid_argument"
    assert caught.value.message.startswith("the CA's node cannot leave its own cluster")


def test_cert_expiring_warns_within_30_days_with_what_to_do(
    tmp_path: Path, journal: Journal
) -> None:
    fresh = cluster(tmp_path, journal, material(with_ca_key=False, lifetime_s=365 * 86400))
    assert fresh.warnings(time.time()) == []
    soon = Cluster(
        fresh._settings,  # the same settings, another certificate
        ME,
        journal,
        material(with_ca_key=False, lifetime_s=20 * 86400),
    )
    (warning,) = soon.warnings(time.time())
    assert warning.code == "cert_expiring"
    assert "expires at" in warning.message and f"renews from {ME}" in warning.message
    # Not yet due for renewal: nothing is asked of anyone.
    assert not asyncio.run(fresh.renew_if_due(time.time()))
