"""A member one release behind still works with the others (docs/cluster.md, "Versions"): this
exod serves and reads the peer messages and events of the previous protocol minor, 1.0."""

from __future__ import annotations

import grpc
import pytest

from exod.cluster import ca_client, join_client
from exod.cluster.protocol import PROTOCOL_VERSION, check_version, major
from exod.errors import ExoError
from exod.eventlog import Record, fold
from exod.eventlog.records import kind_of
from exod.proto.exo.v1 import events_pb2 as pb
from exod.proto.exo.v1 import peer_pb2

PREVIOUS = "1.0"
ME, CA, NEW = "n-00000000000a", "n-0000000000ca", "n-00000000000c"


def test_the_previous_minor_is_accepted_and_another_major_refused() -> None:
    assert major(PROTOCOL_VERSION) == major(PREVIOUS) and PROTOCOL_VERSION != PREVIOUS
    check_version(PREVIOUS, "peer n-1")
    with pytest.raises(ExoError) as caught:
        check_version("0.9", "peer n-1")
    assert caught.value.reason == "protocol_mismatch"


def test_a_join_answered_by_a_1_0_ca_node_takes_the_inviter_as_the_ca_node() -> None:
    inviter = join_client.Inviter(address="192.0.2.1", ca_cert=b"", node_id=CA)
    old = peer_pb2.JoinReply(protocol_version=PREVIOUS, cluster_id="c-1")  # no ca_node_id
    assert join_client.ca_node_of(old, inviter) == CA
    relayed = peer_pb2.JoinReply(protocol_version=PROTOCOL_VERSION, ca_node_id="n-0000000000aa")
    assert join_client.ca_node_of(relayed, inviter) == "n-0000000000aa"


def record(seq: int, event: pb.Event) -> Record:
    return Record(
        seq=seq, origin=ME, origin_seq=seq, ts=1000.0 + seq, kind=kind_of(event), event=event
    )


def test_membership_events_written_by_1_0_fold_as_the_new_ones_do() -> None:
    digest = "ab" * 32
    issued = pb.Event(invite_issued=pb.InviteIssued(secret_digest=digest, expires=2**40))
    joined = pb.NodeJoined(node_id=NEW, name="c", cert_fingerprint="cd" * 32, port=9)
    joined.secret_digest = digest
    old = [record(1, issued), record(2, pb.Event(node_joined=joined))]
    # The same facts as this release writes them, with the fields 1.0 lacks.
    new_issued = pb.Event()
    new_issued.CopyFrom(issued)
    new_issued.invite_issued.inviter = "n-0000000000bb"
    new_joined = pb.Event(node_joined=joined)
    new_joined.node_joined.via = "n-0000000000bb"
    new = [record(1, new_issued), record(2, new_joined)]
    before, after = fold(old, own=ME), fold(new, own=ME)
    assert set(before.members) == set(after.members) == {NEW}
    assert before.invites == after.invites
    assert before.invites[digest].used_by == NEW


def test_a_1_0_ca_node_asked_for_what_it_cannot_do_says_to_upgrade_it() -> None:
    unimplemented = grpc.aio.AioRpcError(
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Method not found!",
        debug_error_string="",
    )
    e = ca_client.refusal(unimplemented, CA, "make an invite")
    assert e.reason == "protocol_mismatch"
    assert e.message == (
        f"the CA's node {CA} runs an earlier exod that cannot make an invite for another "
        "member: upgrade exod there, or run the command on that node"
    )
