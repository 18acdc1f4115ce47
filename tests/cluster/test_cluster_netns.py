"""A cluster of real exods that find each other by mDNS: each exod in a network namespace of its
own (tests/netns.py), mDNS pinned to that namespace's address, exoctl from here over each exod's
Unix socket (which no network namespace hides).

Three members list each other alive; a fourth exod of another cluster on the same LAN is listed
as `refused` (other_cluster), never as a member; a member whose address changed (a new DHCP
lease) is followed at the address mDNS announces, which no log records; mDNS pinned to an
address the machine lacks refuses exod's start (78) and is only logged when a `cluster init`
meets it while serving. Every exod runs inside a namespace; closing the harness checks that the
host's interfaces are as they were.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, wait_until
from tests.netns import Cluster, Node, ip, launch_exod

PEER_TIMEOUT_S = 2.0
PEER_PORT, JOIN_PORT = "52416", "52417"
LISTED_WITHIN_S = 10.0  # the bound: every node lists the others within 10 s


def start(net: Cluster, node: Node, home: Path, address: str = "", **env: str) -> Daemon:
    """exod inside `node`'s namespace, peer port and mDNS pinned to `address` (its own)."""
    address = address or node.addr
    daemon = Daemon.create(
        home,
        EXOD_PEER_BIND=address,
        EXOD_PEER_PORT=PEER_PORT,
        EXOD_JOIN_PORT=JOIN_PORT,
        EXOD_PEER_TIMEOUT=str(PEER_TIMEOUT_S),
        EXOD_MDNS_INTERFACES=address,
        **env,
    )
    launch_exod(net, node, daemon)
    daemon.wait_ready()
    assert net.in_node(daemon.pid, node)
    return daemon


def nodes_of(viewer: Daemon) -> dict[str, dict[str, Any]]:
    return {str(n["id"]): n for n in viewer.status()["nodes"] if n["state"] != "self"}


def node_id(daemon: Daemon) -> str:
    return str(daemon.status()["node_id"])


@pytest.fixture
def net4() -> Iterator[Cluster]:
    with Cluster(n=4) as made:
        yield made


def test_three_members_list_each_other_and_another_clusters_node_is_refused(
    net4: Cluster, tmp_path: Path
) -> None:
    homes = [tmp_path / name for name in "abcd"]
    daemons = [start(net4, node, home) for node, home in zip(net4.nodes, homes, strict=True)]
    a, b, c, d = daemons
    try:
        d.ok("cluster", "init")  # a cluster of its own, announcing on the same LAN
        a.ok("cluster", "init")
        b.ok("cluster", "join", a.ok("cluster", "invite").text.strip())
        # C joins through B, which holds no CA key: B passes the join on to A.
        c.ok("cluster", "join", b.ok("cluster", "invite").text.strip())
        joined = time.monotonic()
        ids = {name: node_id(daemon) for name, daemon in zip("abcd", daemons, strict=True)}
        members = {"a": a, "b": b, "c": c}
        seen: list[dict[str, dict[str, Any]]] = []

        def settled() -> bool:
            views = {name: nodes_of(daemon) for name, daemon in members.items()}
            seen.extend(views.values())
            return (
                all(
                    views[name].get(ids[other], {}).get("state") == "alive"
                    for name in members
                    for other in members
                    if other != name
                )
                and views["a"].get(ids["d"], {}).get("state") == "refused"
            )

        assert wait_until(settled, LISTED_WITHIN_S, poll=0.2), (seen[-3:], a.log()[-3000:])
        assert time.monotonic() - joined <= LISTED_WITHIN_S
        refused = nodes_of(a)[ids["d"]]
        assert refused["reason"] == "other_cluster"
        assert refused["addresses"] == [net4.nodes[3].addr]
        # Never a member: not in any view, at any moment, under another state.
        assert all(view[ids["d"]]["state"] == "refused" for view in seen if ids["d"] in view)
        assert "refused" not in {
            n["state"] for view in seen[-3:] for i, n in view.items() if i != ids["d"]
        }
        assert f"belongs to cluster {d.status()['cluster']['id']}" in a.log()
        # D, for its part, refuses the three.
        assert wait_until(
            lambda: (
                {i: (n["state"], n["reason"]) for i, n in nodes_of(d).items()}
                == {ids[m]: ("refused", "other_cluster") for m in members}
            ),
            LISTED_WITHIN_S,
            poll=0.2,
        ), nodes_of(d)
        # A refusal lasts while D announces: its goodbye drops it from the list.
        d.stop()
        assert wait_until(lambda: ids["d"] not in nodes_of(a), 5, poll=0.2), nodes_of(a)
    finally:
        for daemon in reversed(daemons):
            daemon.cleanup()


def test_a_member_whose_address_changed_is_followed_where_mdns_finds_it(
    tmp_path: Path,
) -> None:
    with Cluster(n=2) as net:
        node_a, node_b = net.nodes
        a = start(net, node_a, tmp_path / "a")
        b = start(net, node_b, tmp_path / "b")
        try:
            a.ok("cluster", "init")
            b.ok("cluster", "join", a.ok("cluster", "invite").text.strip())
            b_id = node_id(b)
            assert wait_until(lambda: nodes_of(a)[b_id]["state"] == "alive", 10, poll=0.2)
            assert b.stop() == 0
            assert wait_until(
                lambda: nodes_of(a)[b_id]["state"] == "unreachable", PEER_TIMEOUT_S + 2, poll=0.2
            )
            # A new lease: B's old address is gone; A's log knows only the old one.
            moved = node_b.addr.rsplit(".", 1)[0] + ".77"
            ip("-n", node_b.ns, "addr", "del", f"{node_b.addr}/24", "dev", node_b.ifname)
            ip("-n", node_b.ns, "addr", "add", f"{moved}/24", "dev", node_b.ifname)
            b = start(net, node_b, b.home, moved)
            assert wait_until(
                lambda: nodes_of(a)[b_id]["state"] == "alive", LISTED_WITHIN_S, poll=0.2
            ), (nodes_of(a), a.log()[-3000:])
            assert f"node {b_id} ({moved})" in a.log()
        finally:
            b.cleanup()
            a.cleanup()


def test_mdns_pinned_to_an_address_the_machine_lacks(tmp_path: Path) -> None:
    with Cluster(n=1) as net:
        [node] = net.nodes
        nobody = node.addr.rsplit(".", 1)[0] + ".200"  # on its subnet, but not its own
        daemon = start(net, node, tmp_path / "a", EXOD_LOG_LEVEL="error")
        daemon.env["EXOD_MDNS_INTERFACES"] = nobody
        try:
            # Not a member: mDNS is off, so the setting does not matter yet.
            assert daemon.stop() == 0
            launch_exod(net, node, daemon)
            daemon.wait_ready()
            # Serving already: `init` works, mDNS's failure is logged, exod goes on.
            daemon.ok("cluster", "init")
            assert f"mDNS: {nobody} is not an address of this machine" in daemon.log()
            assert daemon.status()["cluster"] is not None
            assert daemon.stop() == 0
            # At start, a member with a wrong pinned address: 78 and one line.
            mark = len(daemon.log())
            launch_exod(net, node, daemon)
            assert daemon.proc is not None
            assert daemon.proc.wait(30) == 78, daemon.log()
            said = daemon.log()[mark:]
            assert said == (
                f"exod: mDNS: {nobody} is not an address of this machine (it has 127.0.0.1, "
                f"{node.addr}): set EXOD_MDNS_INTERFACES to addresses of its own interfaces, "
                "or leave it empty for all\n"
            ), said
        finally:
            daemon.cleanup()
