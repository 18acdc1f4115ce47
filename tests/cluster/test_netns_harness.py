"""tests/netns.py itself: the nodes share one LAN that carries multicast, cut() unplugs a node
and restore() plugs it back, and closing leaves nothing behind, even when the test fails."""

from __future__ import annotations

import ipaddress
import sys

import pytest

from tests.daemon import LineReader
from tests.netns import (
    Cluster,
    Node,
    cannot,
    free_subnets,
    host_links,
    netns_names,
    route_destinations,
)

GROUP = "239.255.40.1"  # not mDNS's: this test is about the LAN, not about zeroconf
PORT = 40001

# Prints "ready", then each datagram it gets, on port PORT, unicast or sent to GROUP.
RECEIVER = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", {PORT}))
group = socket.inet_aton("{GROUP}") + socket.inet_aton(sys.argv[1])
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
print("ready", flush=True)
while True:
    print(s.recv(100).decode(), flush=True)
"""

# Sends "TAG multicast" to GROUP out of the address argv[1], and "TAG unicast" to each other.
SENDER = f"""
import socket, sys
tag, source, targets = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
s.sendto((tag + " multicast").encode(), ("{GROUP}", {PORT}))
for target in targets:
    s.sendto((tag + " unicast").encode(), (target, {PORT}))
"""


def send(net: Cluster, sender: Node, tag: str, to: list[Node]) -> None:
    argv = [sys.executable, "-I", "-c", SENDER, tag, sender.addr, *(n.addr for n in to)]
    net.exec(sender, argv)


def received(lines: LineReader, count: int) -> list[str]:
    return sorted(lines.next(timeout=5.0).decode().strip() for _ in range(count))


def test_the_lan_carries_multicast_and_cut_unplugs_a_node_until_restored() -> None:
    with Cluster(n=3) as net:
        a, b, c = net.nodes
        assert len({n.ns for n in net.nodes} | {net.bridge_ns}) == 4
        assert all(
            ipaddress.ip_address(n.addr) in ipaddress.ip_network(net.subnet) for n in net.nodes
        )
        listeners = {}
        for node in (b, c):
            proc = net.run(node, [sys.executable, "-I", "-c", RECEIVER, node.addr])
            listeners[node.index] = LineReader(proc)
            assert listeners[node.index].next(timeout=10.0) == b"ready\n"
        both = ["m1 multicast", "m1 unicast"]

        send(net, a, "m1", [b, c])
        assert received(listeners[b.index], 2) == both
        assert received(listeners[c.index], 2) == both

        net.cut(c)
        send(net, a, "m2", [b, c])
        assert received(listeners[b.index], 2) == ["m2 multicast", "m2 unicast"]
        with pytest.raises(AssertionError, match="no line"):
            listeners[c.index].next(timeout=1.0)  # unplugged: neither arrived

        net.restore(c)
        send(net, a, "m3", [b, c])
        assert received(listeners[b.index], 2) == ["m3 multicast", "m3 unicast"]
        assert received(listeners[c.index], 2) == ["m3 multicast", "m3 unicast"]  # m2 lost


def test_closing_removes_everything_even_when_the_test_failed() -> None:
    links = host_links()
    with pytest.raises(RuntimeError, match="the test failed"), Cluster(n=2) as net:
        ours = {net.bridge_ns} | {n.ns for n in net.nodes}
        assert ours <= netns_names()
        assert host_links() == links  # every link of ours lives in our namespaces
        sleeper = net.run(net.nodes[0], ["sleep", "60"])
        raise RuntimeError("the test failed")
    assert not ours & netns_names()
    assert sleeper.returncode is not None  # ended by close(), its namespace deleted after it
    assert host_links() == links


def test_without_namespaces_a_test_skips_or_fails_where_ci_demands_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EXOD_REQUIRE_NETNS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no netns here"):
        cannot("no netns here")
    monkeypatch.setenv("EXOD_REQUIRE_NETNS", "1")
    with pytest.raises(pytest.fail.Exception, match="EXOD_REQUIRE_NETNS=1, but no netns here"):
        cannot("no netns here")


ROUTES = """\
default via 192.0.2.1 dev eth0
10.231.0.0/17 dev tun0 scope link
192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2
local 10.231.200.7 dev eth1 table local proto kernel scope host src 10.231.200.7
broadcast 127.255.255.255 dev lo table local proto kernel scope link src 127.0.0.1
unreachable 10.231.250.0/24
"""


def test_route_destinations_read_every_kind_of_route_but_the_default() -> None:
    assert [str(n) for n in route_destinations(ROUTES)] == [
        "10.231.0.0/17",
        "192.0.2.0/24",
        "10.231.200.7/32",
        "127.255.255.255/32",
        "10.231.250.0/24",
    ]


def test_the_lan_subnets_avoid_every_host_route() -> None:
    taken = route_destinations(ROUTES)
    for _ in range(50):
        chosen = free_subnets(2, taken)
        assert len(set(chosen)) == 2
        for prefix in chosen:
            third = int(prefix.split(".")[2])
            assert 128 <= third <= 254 and third not in (200, 250), chosen
    with pytest.raises(AssertionError, match="no free /24"):
        free_subnets(1, [ipaddress.IPv4Network("10.231.0.0/16")])
