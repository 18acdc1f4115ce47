"""The pure parts of joining a cluster: the invites' bookkeeping (fold), the check of a joiner's
secret, the addresses an invite names, the protocol version, the --ttl argument."""

from __future__ import annotations

import pytest

from exoctl.cluster import parse_ttl
from exod.cluster import addresses, joining
from exod.cluster.invite import secret_digest
from exod.cluster.protocol import PROTOCOL_VERSION, check_version
from exod.errors import ExoError
from exod.eventlog import Record
from exod.eventlog.fold import EMPTY, State, decode, encode, fold
from exod.proto.exo.v1 import events_pb2

SECRET = b"s" * 16
OTHER = b"o" * 16


def record(seq: int, ts: float, event: events_pb2.Event) -> Record:
    kind = event.WhichOneof("kind")
    assert kind is not None
    name = type(getattr(event, kind)).__name__
    return Record(seq=seq, origin="n-1", origin_seq=seq, ts=ts, kind=name, event=event)


def issued(secret: bytes, expires: int) -> events_pb2.Event:
    made = events_pb2.InviteIssued(secret_digest=secret_digest(secret), expires=expires)
    return events_pb2.Event(invite_issued=made)


def joined(node_id: str, secret: bytes) -> events_pb2.Event:
    j = events_pb2.NodeJoined(
        node_id=node_id,
        name="studio",
        cert_fingerprint="ab" * 32,
        secret_digest=secret_digest(secret),
        addresses=["10.0.0.2"],
        port=52416,
    )
    return events_pb2.Event(node_joined=j)


def state(*events: tuple[float, events_pb2.Event]) -> State:
    return fold(record(i + 1, ts, e) for i, (ts, e) in enumerate(events))


# --- the fold ---------------------------------------------------------------------------------


def test_an_invite_is_kept_by_digest_and_marked_used_by_the_join() -> None:
    s = state((100, issued(SECRET, 1000)), (200, joined("n-2", SECRET)))
    (invite,) = s.invites.values()
    assert (invite.digest, invite.expires, invite.used_by) == (secret_digest(SECRET), 1000, "n-2")
    assert SECRET.hex() not in encode(s).decode()  # the secret is never kept, only its digest
    assert s.members["n-2"].addresses == ("10.0.0.2",)


def test_expired_invites_are_forgotten_when_the_next_is_issued() -> None:
    s = state((100, issued(SECRET, 150)), (200, issued(OTHER, 1000)))
    assert list(s.invites) == [secret_digest(OTHER)]


def test_the_cluster_state_survives_a_snapshot() -> None:
    entered = events_pb2.ClusterEntered(cluster_id="c-1", ca_node_id="n-1", how="init")
    s = state(
        (1, events_pb2.Event(cluster_entered=entered)),
        (100, issued(SECRET, 1000)),
        (200, joined("n-2", SECRET)),
    )
    assert decode(encode(s)) == s
    assert s.ca_node == "n-1"


def test_a_snapshot_from_before_the_cluster_reads_as_none() -> None:
    doc = b'{"last_seq":1,"starts":1,"runners":[],"runs":[],"models":[]}'
    s = decode(doc)
    assert (dict(s.invites), dict(s.members), s.ca_node) == ({}, {}, "")


# --- admitting a joiner -------------------------------------------------------------------------


def test_admit_the_secret_of_an_unused_unexpired_invite() -> None:
    s = state((100, issued(OTHER, 1000)), (100, issued(SECRET, 1000)))
    assert joining.admit(s.invites, SECRET, 500).digest == secret_digest(SECRET)


@pytest.mark.parametrize(
    ("history", "words"),
    [
        ([(100, issued(SECRET, 1000)), (200, joined("n-2", SECRET))], "used already (by n-2)"),
        ([(100, issued(SECRET, 400))], "has expired"),
        ([(100, issued(OTHER, 1000))], "was not issued by this cluster's CA node"),
        ([], "was not issued"),
    ],
)
def test_refuse_a_used_expired_or_unknown_secret(
    history: list[tuple[float, events_pb2.Event]], words: str
) -> None:
    with pytest.raises(ExoError) as caught:
        joining.admit(state(*history).invites, SECRET, 500)
    assert caught.value.reason == "invite_refused"
    assert words in caught.value.message and "`exoctl cluster invite`" in caught.value.message


def test_the_empty_state_has_no_invites() -> None:
    assert not EMPTY.invites and not EMPTY.members


# --- addresses ------------------------------------------------------------------------------------


def test_a_bound_address_is_the_one_named() -> None:
    assert addresses.invite_addresses("127.0.0.1", ["10.0.0.2"]) == ("127.0.0.1",)
    assert addresses.invite_addresses("::1", []) == ("::1",)


def test_the_wildcard_names_the_non_loopback_ipv4_addresses() -> None:
    machine = [
        "127.0.0.1",
        "aa:bb:cc:dd:ee:ff",  # a MAC address, as psutil lists it
        "192.168.1.20",
        "fe80::1%en0",
        "169.254.3.4",
        "10.0.0.5",
        "192.168.1.20",
        "2001:db8::1",
    ]
    assert addresses.invite_addresses("0.0.0.0", machine) == ("192.168.1.20", "10.0.0.5")


def test_at_most_a_few_addresses_keep_the_token_short() -> None:
    machine = [f"10.0.0.{i}" for i in range(1, 10)]
    assert len(addresses.invite_addresses("0.0.0.0", machine)) == addresses.MAX_ADDRESSES


def test_no_address_to_be_reached_at_says_so() -> None:
    with pytest.raises(ExoError) as caught:
        addresses.invite_addresses("0.0.0.0", ["127.0.0.1", "::1"])
    assert caught.value.reason == "peer_unreachable"
    assert "EXOD_PEER_BIND" in caught.value.message


# --- protocol version, --ttl ------------------------------------------------------------------


def test_another_major_version_is_refused_naming_both() -> None:
    check_version(PROTOCOL_VERSION.split(".")[0] + ".99", "peer n-2")  # a minor is fine
    with pytest.raises(ExoError) as caught:
        check_version("2.0", "peer n-2")
    assert caught.value.reason == "protocol_mismatch"
    assert "2.0" in caught.value.message and PROTOCOL_VERSION in caught.value.message
    with pytest.raises(ExoError, match="speaks peer protocol none"):
        check_version("", "the joining node")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("900", 900), ("1s", 1), ("15m", 900), ("2h", 7200), ("7d", 7 * 86400), (" 15M ", 900)],
)
def test_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["0", "8d", "15x", "", "-1m", "1.5h"])
def test_a_bad_ttl_says_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="from 1s to 7d"):
        parse_ttl(text)
