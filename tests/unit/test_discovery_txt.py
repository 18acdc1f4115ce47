"""The discovery adapter's pure parts: the TXT records announced, the parsing of what arrives
from the LAN (malformed records raise Malformed, nothing else), and the addresses announced."""

from __future__ import annotations

import pytest

from exod.cluster.candidates import Candidate, Me
from exod.cluster.discovery import (
    TXT_KEYS,
    DiscoveryError,
    Malformed,
    announced_addresses,
    parse,
    txt_records,
)

ME = Me(node_id="n-4f2a9c", cluster_id="c-81be02", proto="1.0")
NAME = "n-4f2a9c._exod._tcp.local."
GOOD: dict[bytes, bytes | None] = {
    b"cluster": b"c-81be02",
    b"node": b"n-4f2a9c",
    b"proto": b"1.0",
    b"port": b"52416",
}


def test_the_four_records_and_nothing_else() -> None:
    assert txt_records(ME, 52416) == {
        "cluster": "c-81be02",
        "node": "n-4f2a9c",
        "proto": "1.0",
        "port": "52416",
    }
    assert tuple(txt_records(ME, 52416)) == TXT_KEYS


@pytest.mark.parametrize(
    ("me", "port"),
    [
        (Me("n x", "c-1", "1.0"), 52416),
        (Me("n-" + "x" * 62, "c-1", "1.0"), 52416),  # longer than a DNS label
        (Me("n-1", "", "1.0"), 52416),
        (Me("n-1", "c-1", "v1"), 52416),
        (Me("n-1", "c-1", ""), 52416),
        (Me("n-1", "c-1", "1.0"), 0),
        (Me("n-1", "c-1", "1.0"), 65536),
    ],
)
def test_what_cannot_be_announced_is_a_bug_caught_early(me: Me, port: int) -> None:
    with pytest.raises(ValueError, match=r"cannot be announced|out of range"):
        txt_records(me, port)


def test_what_is_announced_parses_back() -> None:
    properties = {k.encode(): v.encode() for k, v in txt_records(ME, 52416).items()}
    found = parse(NAME, properties, ["10.0.0.2", "fe80::1%3"], own=True)
    assert found == Candidate(
        node_id="n-4f2a9c",
        cluster_id="c-81be02",
        proto="1.0",
        addresses=("10.0.0.2", "fe80::1%3"),
        port=52416,
        name=NAME,
        own=True,
    )


def test_keys_are_case_insensitive_the_first_counts_and_unknown_keys_are_ignored() -> None:
    properties: dict[bytes, bytes | None] = {
        b"Cluster": b"c-81be02",
        b"cluster": b"c-other",
        b"NODE": b"n-4f2a9c",
        b"proto": b"2.1",
        b"port": b"7",
        b"memory": b"whatever a later version adds",
    }
    found = parse(NAME, properties, ["10.0.0.2"])
    assert (found.cluster_id, found.node_id, found.proto, found.port) == (
        "c-81be02",
        "n-4f2a9c",
        "2.1",
        7,
    )
    assert not found.own


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({b"cluster": None}, "no cluster= record"),
        ({b"node": b""}, "node='' is not valid"),
        ({b"node": b"n 1"}, "node='n 1' is not valid"),
        ({b"node": b"-n"}, "node='-n' is not valid"),
        ({b"node": b"n-" + b"x" * 62}, "is not valid"),
        ({b"node": b"\xff\xfe"}, "node= is not ASCII"),
        ({b"cluster": "c-\u00e9".encode()}, "cluster= is not ASCII"),
        ({b"cluster": b"c;rm"}, "is not valid"),
        ({b"proto": b"one"}, "proto='one' is not valid"),
        ({b"proto": b"-1"}, "is not valid"),
        ({b"proto": b"1."}, "is not valid"),
        ({b"proto": b"1.0.0.0"}, "is not valid"),
        ({b"proto": b"123456"}, "is not valid"),
        ({b"port": b"0"}, "port=0 is out of range"),
        ({b"port": b"65536"}, "port=65536 is out of range"),
        ({b"port": b"0x50"}, "is not valid"),
        ({b"port": b" 80"}, "is not valid"),
    ],
)
def test_malformed_records_say_what_is_wrong(change: dict[bytes, bytes | None], why: str) -> None:
    properties = {**GOOD}
    for key, value in change.items():
        properties[key] = value
    with pytest.raises(Malformed) as raised:
        parse(NAME, properties, ["10.0.0.2"])
    assert why in str(raised.value)


@pytest.mark.parametrize("key", [b"cluster", b"node", b"proto", b"port"])
def test_each_record_is_required(key: bytes) -> None:
    properties = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(Malformed, match=f"no {key.decode()}= record"):
        parse(NAME, properties, ["10.0.0.2"])


def test_no_records_at_all_or_undecodable_keys() -> None:
    with pytest.raises(Malformed):
        parse(NAME, {}, ["10.0.0.2"])
    with pytest.raises(Malformed):
        parse(NAME, {b"\xff": b"x", b"=": None}, ["10.0.0.2"])


@pytest.mark.parametrize(
    ("addresses", "why"), [([], "no address records"), (["10.0.0.300"], "not an IP address")]
)
def test_addresses_must_be_there_and_be_addresses(addresses: list[str], why: str) -> None:
    with pytest.raises(Malformed, match=why):
        parse(NAME, GOOD, addresses)


MACHINE = ["127.0.0.1", "192.168.1.20", "10.0.0.5", "::1", "fe80::1"]


def test_unpinned_announces_every_ipv4_address_but_loopback() -> None:
    assert announced_addresses(None, MACHINE) == ["192.168.1.20", "10.0.0.5"]


def test_pinned_announces_exactly_the_pinned_addresses() -> None:
    assert announced_addresses(["10.0.0.5"], MACHINE) == ["10.0.0.5"]
    assert announced_addresses(["10.0.0.5", "10.0.0.5", "fe80::1"], MACHINE) == [
        "10.0.0.5",
        "fe80::1",
    ]


@pytest.mark.parametrize(
    ("interfaces", "machine", "message"),
    [
        (["10.9.9.9"], MACHINE, "mDNS: 10.9.9.9 is not an address of this machine (it has "),
        (["eth0"], MACHINE, "mDNS: 'eth0' is not an IP address"),
        ([], MACHINE, "mDNS: the list of interface addresses is empty"),
        (None, ["127.0.0.1", "::1"], "mDNS: this machine has no network address to announce"),
    ],
)
def test_addresses_that_cannot_be_announced(
    interfaces: list[str] | None, machine: list[str], message: str
) -> None:
    with pytest.raises(DiscoveryError) as raised:
        announced_addresses(interfaces, machine)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)
