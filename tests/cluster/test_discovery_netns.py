"""Discovery between real nodes: zeroconf in network namespaces this module creates, on a LAN
that exists only there, each probe pinned to its namespace's address (tests/netns.py; the probe
is tests/cluster/probe.py, which runs exod's discovery adapter).

Nothing here multicasts on the machine's interfaces: every zeroconf runs in a namespace of ours
(the probe refuses to run anywhere else, and each test checks where it ran), and none is ever
created in the pytest process.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exod.cluster.protocol import PROTOCOL_VERSION
from tests.cluster.probe import ROGUE
from tests.daemon import wait_until
from tests.netns import DECOY, DECOY_PEER, IFNAME, Cluster, Node

ROOT = Path(__file__).resolve().parents[2]
MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
PEER_PORT = 52416
FOUND_WITHIN_S = 10.0  # the bound: every node lists the others within 10 s
GONE_WITHIN_S = 5.0  # a goodbye is acted on within a second (RFC 6762 10.1)

Event = dict[str, Any]


@dataclass
class Probe:
    node: Node
    proc: subprocess.Popen[bytes]
    log: Path
    events: list[Event] = field(default_factory=list)
    lines: queue.Queue[bytes | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self.pump, daemon=True).start()

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self.lines.put(line)
        self.lines.put(None)  # the end of its output

    def read(self, timeout: float) -> bool:
        """Read one event into `events` within `timeout`; False at the end or on a timeout."""
        try:
            line = self.lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return False
        if line is None:
            self.lines.put(None)  # stays the end for any later read
            return False
        self.events.append(json.loads(line))
        return True

    def wait(self, what: Callable[[Event], bool], until: float) -> Event:
        """The first event (already read or to come before monotonic time `until`) that `what`
        accepts."""
        checked = 0
        while True:
            for event in self.events[checked:]:
                if what(event):
                    return event
            checked = len(self.events)
            if not self.read(until - time.monotonic()):
                raise AssertionError(
                    f"{self.node}: not seen in time; its events {self.events}; "
                    f"exit {self.proc.poll()}; stderr {self.stderr()!r}"
                )

    def stop(self) -> int:
        """SIGTERM (the probe says goodbye and exits); its exit code, once all its output is
        in `events`."""
        os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=10)
        while self.read(timeout=10.0):
            pass
        return code

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start(net: Cluster, node: Node, tmp_path: Path, *args: str) -> Probe:
    log = tmp_path / f"probe-{node.index}.err"
    with open(log, "wb") as err:
        proc = net.run(
            node,
            [sys.executable, "-m", "tests.cluster.probe", "--seconds", "60", *args],
            stderr=err,
            cwd=str(ROOT),
        )
    # `ip netns exec` execs the probe: this pid is the probe's, in the node's namespace.
    assert wait_until(lambda: net.in_node(proc.pid, node), timeout=5.0), f"not in {node}"
    return Probe(node, proc, log)


def seen(node_id: str, *, own: bool = False) -> Callable[[Event], bool]:
    return lambda e: e["event"] == "seen" and e["node_id"] == node_id and e["own"] is own


def gone(node_id: str) -> Callable[[Event], bool]:
    return lambda e: e["event"] == "gone" and e["node_id"] == node_id


def ready(e: Event) -> bool:
    return bool(e["event"] == "ready")


def assert_pinned(net: Cluster, probe: Probe, quiet_decoy: int) -> None:
    """mDNS on `probe.node` kept to its pinned address: sockets on it (and the wildcard one
    that receiving multicast needs, and nothing else), the mDNS group joined on its interface
    only, and not one packet out of the decoy interface beside it."""
    node = probe.node
    sockets = net.udp_sockets(node)
    assert sockets, f"no UDP socket in {node}"
    assert {pid for _, _, pid in sockets} == {probe.proc.pid}, sockets
    assert {(a, port) for a, port, _ in sockets} == {
        ("0.0.0.0", MDNS_PORT),
        (node.addr, MDNS_PORT),
    }, sockets
    groups = net.multicast_groups(node)
    assert MDNS_GROUP in groups[IFNAME], groups
    assert [i for i, g in groups.items() if MDNS_GROUP in g] == [IFNAME], groups
    assert net.tx_packets(node, DECOY) == quiet_decoy, f"mDNS went out of {DECOY} in {node}"


def test_a_node_finds_its_cluster_sees_another_cluster_and_sees_a_member_leave(
    tmp_path: Path,
) -> None:
    with Cluster(n=4, decoy=True) as net:
        a1, a2, b1, junk = net.nodes
        quiet = {n.index: net.tx_packets(n, DECOY) for n in net.nodes}
        began = time.monotonic()
        rogue = start(net, junk, tmp_path, "--interfaces", junk.addr, "--rogue")
        p1, p2, p3 = (
            start(net, node, tmp_path, "--interfaces", node.addr, "--cluster", c, "--node", n)
            for node, c, n in ((a1, "c-a", "n-a1"), (a2, "c-a", "n-a2"), (b1, "c-b", "n-b1"))
        )
        probes = [p1, p2, p3, rogue]
        assert not any(net.in_node(os.getpid(), node) for node in net.nodes)

        # Within 10 s of starting, node 1 lists node 2 as a candidate of its cluster, node 3
        # with the other cluster's id (for the caller to refuse with a message), and itself.
        deadline = began + FOUND_WITHIN_S
        member = p1.wait(seen("n-a2"), deadline)
        assert member["verdict"] == "member", member
        assert (member["cluster_id"], member["proto"], member["port"]) == (
            "c-a",
            PROTOCOL_VERSION,
            PEER_PORT,
        )
        assert member["addresses"] == [a2.addr], member
        other = p1.wait(seen("n-b1"), deadline)
        assert other["verdict"] == "other_cluster", other
        assert (other["cluster_id"], other["addresses"]) == ("c-b", [b1.addr]), other
        itself = p1.wait(seen("n-a1", own=True), deadline)
        assert itself["verdict"] == "self" and itself["addresses"] == [a1.addr], itself
        # ... and the others see it alike.
        assert p2.wait(seen("n-a1"), deadline)["verdict"] == "member"
        assert p3.wait(seen("n-a1"), deadline)["verdict"] == "other_cluster"
        assert p3.wait(seen("n-a2"), deadline)["cluster_id"] == "c-a"
        rogue.wait(ready, deadline)

        # Every one of them kept to its namespace's address (the decoy beside it got nothing).
        for probe in probes:
            assert_pinned(net, probe, quiet[probe.node.index])

        # Records that are not exod's: each logged once as ignored, none reported, no crash.
        names = [f"{name}._exod._tcp.local." for name in ROGUE]
        assert wait_until(
            lambda: all(name in p1.stderr() for name in names), timeout=FOUND_WITHIN_S, poll=0.1
        ), p1.stderr()
        for name in names:
            [line] = [line for line in p1.stderr().splitlines() if name in line]
            assert "not an exod announcement: " in line, line

        # Node 2 stops: it says goodbye, and node 1 sees it leave at once.
        assert p2.stop() == 0, p2.stderr()
        stopped = time.monotonic()
        left = p1.wait(gone("n-a2"), stopped + GONE_WITHIN_S)
        assert left["name"] == member["name"], left
        assert p1.proc.poll() is None, "node 1 went down with node 2"

        for probe in (p1, p3, rogue):
            assert probe.stop() == 0, probe.stderr()
        for probe in probes:
            assert probe.events[-1]["event"] == "stopped", probe.events
            assert "Traceback" not in probe.stderr(), probe.stderr()
        reported = {e["name"] for e in p1.events if e["event"] in ("seen", "gone")}
        assert not reported & set(names), reported
        assert reported == {f"n-{n}._exod._tcp.local." for n in ("a1", "a2", "b1")}, reported


def test_a_second_node_with_the_same_id_is_reported_not_merged(tmp_path: Path) -> None:
    """A copied home: two machines announce one node id. The later one's service is renamed
    (it cannot take a name in use) and each reports the other as a duplicate."""
    with Cluster(n=2) as net:
        first, second = net.nodes
        began = time.monotonic()
        p1 = start(net, first, tmp_path, "--interfaces", first.addr, "--node", "n-dup")
        p1.wait(ready, began + FOUND_WITHIN_S)
        p2 = start(net, second, tmp_path, "--interfaces", second.addr, "--node", "n-dup")
        deadline = time.monotonic() + FOUND_WITHIN_S
        mine = p2.wait(seen("n-dup", own=True), deadline)
        assert mine["name"] != "n-dup._exod._tcp.local.", mine  # renamed, not merged
        copy = p1.wait(seen("n-dup"), deadline)
        assert copy["verdict"] == "duplicate_id" and copy["addresses"] == [second.addr], copy
        original = p2.wait(seen("n-dup"), deadline)
        assert original["verdict"] == "duplicate_id", original
        assert original["addresses"] == [first.addr], original
        assert p1.stop() == 0 and p2.stop() == 0


def test_unpinned_mdns_uses_every_interface_so_the_pinning_checks_can_fail(
    tmp_path: Path,
) -> None:
    """The control for assert_pinned: without pinning, zeroconf binds, joins and sends on the
    decoy interface too (and on loopback), and each of those checks sees it."""
    with Cluster(n=1, decoy=True) as net:
        [node] = net.nodes
        quiet = net.tx_packets(node, DECOY)
        probe = start(net, node, tmp_path, "--interfaces", "all", "--node", "n-all")
        itself = probe.wait(seen("n-all", own=True), time.monotonic() + FOUND_WITHIN_S)
        assert sorted(itself["addresses"]) == sorted([node.addr, str(node.decoy_addr)]), itself
        bound = {address for address, _, _ in net.udp_sockets(node)}
        assert {node.addr, str(node.decoy_addr), "127.0.0.1"} <= bound, bound
        groups = net.multicast_groups(node)
        assert MDNS_GROUP in groups[DECOY] and MDNS_GROUP not in groups[DECOY_PEER], groups
        assert net.tx_packets(node, DECOY) > quiet
        assert probe.stop() == 0, probe.stderr()


def test_a_pinned_address_that_is_not_the_machines_is_one_line_and_no_mdns(
    tmp_path: Path,
) -> None:
    with Cluster(n=1) as net:
        [node] = net.nodes
        elsewhere = node.addr.rsplit(".", 1)[0] + ".200"  # on its subnet, but nobody's
        probe = start(net, node, tmp_path, "--interfaces", elsewhere)
        assert probe.proc.wait(timeout=30) == 1
        assert probe.stderr() == (
            f"probe: mDNS: {elsewhere} is not an address of this machine (it has 127.0.0.1, "
            f"{node.addr}): set EXOD_MDNS_INTERFACES to addresses of its own interfaces, "
            "or leave it empty for all\n"
        )
        assert not probe.read(timeout=10.0)  # the end of its output: not even "ready"
        assert probe.events == []
        assert net.udp_sockets(node) == []
