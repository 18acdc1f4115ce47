"""Removal entries: the canonical encoding the CA signs, the signature check, and the fold that
obeys a removal only when this cluster's CA signed it."""

from __future__ import annotations

import pytest

from exod.cluster import pki, revocation
from exod.eventlog import EMPTY, Record, State, decode, encode, fold, kind_of
from exod.proto.exo.v1 import events_pb2 as pb

ME, CA_NODE, OTHER = "n-00000000000a", "n-00000000000c", "n-00000000000b"
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.new_ca("c-000000000001", 86400, NOW)


@pytest.fixture(scope="module")
def other_ca() -> tuple[bytes, bytes]:
    return pki.new_ca("c-000000000002", 86400, NOW)


def test_canonical_is_the_tag_and_the_fields_one_a_line() -> None:
    data = revocation.canonical(OTHER, "ab" * 32, NOW, "remove")
    assert data == f"exod node-removed v1\n{OTHER}\n{'ab' * 32}\n{NOW}\nremove".encode()
    # Every field is signed: changing any one changes the bytes.
    assert data != revocation.canonical(OTHER, "ab" * 32, NOW, "leave")
    assert data != revocation.canonical(OTHER, "ab" * 32, NOW + 1, "remove")
    assert data != revocation.canonical(ME, "ab" * 32, NOW, "remove")


@pytest.mark.parametrize(
    ("node_id", "how"), [(f"{OTHER}\n1", "remove"), ("", "remove"), (OTHER, "ban"), (OTHER, "")]
)
def test_canonical_refuses_a_field_that_could_blur_it(node_id: str, how: str) -> None:
    with pytest.raises(ValueError):
        revocation.canonical(node_id, "ab" * 32, NOW, how)


def test_a_signed_removal_verifies_with_its_ca_only(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    entry = revocation.sign(ca[0], OTHER, "ab" * 32, NOW, "remove")
    assert revocation.verified(ca[1], entry)
    assert not revocation.verified(other_ca[1], entry)  # another cluster's CA
    assert not revocation.verified(b"", entry)  # no CA known (not in a cluster)
    assert not revocation.verified(b"not a certificate", entry)


@pytest.mark.parametrize("field", ["node_id", "cert_fingerprint", "ts", "how", "signature"])
def test_an_altered_removal_does_not_verify(ca: tuple[bytes, bytes], field: str) -> None:
    entry = revocation.sign(ca[0], OTHER, "ab" * 32, NOW, "remove")
    altered = pb.NodeRemoved()
    altered.CopyFrom(entry)
    match field:
        case "node_id":
            altered.node_id = ME
        case "cert_fingerprint":
            altered.cert_fingerprint = "cd" * 32
        case "ts":
            altered.ts = NOW + 1
        case "how":
            altered.how = "leave"
        case _:
            altered.signature = b"\x30\x00garbage"
    assert not revocation.verified(ca[1], altered)


# --- the fold -------------------------------------------------------------------------------------


def rec(seq: int, origin: str, event: pb.Event) -> Record:
    kind = kind_of(event)
    return Record(
        seq=seq, origin=origin, origin_seq=seq, ts=float(NOW + seq), kind=kind, event=event
    )


def member_of(ca_cert: bytes, *after: Record) -> State:
    """ME's state after joining through CA_NODE, which admitted OTHER, then `after`."""
    entered = pb.ClusterEntered(
        cluster_id="c-000000000001", how="join", ca_node_id=CA_NODE, ca_cert=ca_cert
    )
    joined = pb.NodeJoined(node_id=OTHER, name="b", cert_fingerprint="ab" * 32, port=1)
    base = [
        rec(1, ME, pb.Event(cluster_entered=entered)),
        rec(2, CA_NODE, pb.Event(node_joined=joined)),
    ]
    return fold([*base, *after], own=ME)


def removal(seq: int, origin: str, entry: pb.NodeRemoved) -> Record:
    return rec(seq, origin, pb.Event(node_removed=entry))


def test_a_removal_signed_by_the_ca_marks_the_member_removed(ca: tuple[bytes, bytes]) -> None:
    entry = revocation.sign(ca[0], OTHER, "ab" * 32, NOW, "remove")
    state = member_of(ca[1], removal(3, CA_NODE, entry))
    assert state.members[OTHER].removed
    assert set(state.removed) == {OTHER} and state.removed[OTHER].how == "remove"
    # Kept across a snapshot, and a later entry about it cannot bring it back.
    assert decode(encode(state)) == state
    learned = pb.MembersLearned(members=[pb.KnownMember(node_id=OTHER, name="b", port=1)])
    later = fold([rec(4, ME, pb.Event(members_learned=learned))], state, own=ME)
    assert later.members[OTHER].removed


def test_a_removal_signed_by_another_ca_is_ignored(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    forged = revocation.sign(other_ca[0], OTHER, "ab" * 32, NOW, "remove")
    state = member_of(ca[1], removal(3, CA_NODE, forged))
    assert not state.members[OTHER].removed and not state.removed
    assert "not signed by this cluster's CA" in caplog.text


def test_an_unsigned_removal_written_by_any_member_is_ignored(ca: tuple[bytes, bytes]) -> None:
    unsigned = pb.NodeRemoved(node_id=OTHER, cert_fingerprint="ab" * 32, ts=NOW, how="remove")
    state = member_of(ca[1], removal(3, OTHER, unsigned), removal(4, ME, unsigned))
    assert not state.members[OTHER].removed and not state.removed


def test_a_node_in_no_cluster_obeys_no_removal(ca: tuple[bytes, bytes]) -> None:
    entry = revocation.sign(ca[0], OTHER, "ab" * 32, NOW, "remove")
    assert fold([removal(1, ME, entry)], EMPTY, own=ME).removed == {}


def test_leaving_forgets_the_cluster(ca: tuple[bytes, bytes]) -> None:
    entry = revocation.sign(ca[0], OTHER, "ab" * 32, NOW, "remove")
    left = rec(4, ME, pb.Event(cluster_left=pb.ClusterLeft(cluster_id="c-000000000001")))
    state = member_of(ca[1], removal(3, CA_NODE, entry), left)
    assert (state.members, state.removed, state.ca_node, state.ca_cert) == ({}, {}, "", "")
    assert state.peers[CA_NODE].held == 3  # what it holds of others stays theirs
