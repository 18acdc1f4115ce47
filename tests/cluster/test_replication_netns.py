"""Replication across a real link: two exods in network namespaces of their own (tests/netns.py),
the link between them cut and restored as when a cable is pulled.

B shows A unreachable within EXOD_PEER_TIMEOUT + 2 s of the cut, and holds what A wrote
meanwhile within EXOD_PEER_TIMEOUT + 10 s of the restore, in order, with no gap or duplicate.
exoctl reaches each exod through its Unix socket, which no network namespace hides.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, replicated_stream, wait_until
from tests.models import demo_model
from tests.netns import Cluster, Node, launch_exod

PEER_TIMEOUT_S = 2.0
PEER_PORT, JOIN_PORT = "52416", "52417"


def start(net: Cluster, node: Node, home: Path) -> Daemon:
    daemon = Daemon.create(
        home,
        EXOD_PEER_BIND=node.addr,
        EXOD_PEER_PORT=PEER_PORT,
        EXOD_JOIN_PORT=JOIN_PORT,
        EXOD_PEER_TIMEOUT=str(PEER_TIMEOUT_S),
    )
    launch_exod(net, node, daemon)
    daemon.wait_ready()
    return daemon


def state_of(viewer: Daemon, node_id: str) -> str:
    states = {n["id"]: n["state"] for n in viewer.status()["nodes"]}
    return str(states.get(node_id, "unlisted"))


@pytest.fixture
def net() -> Iterator[Cluster]:
    with Cluster(n=2) as made:
        yield made


def test_a_cut_link_makes_a_unreachable_and_b_catches_up_after_the_restore(
    net: Cluster, tmp_path: Path
) -> None:
    node_a, node_b = net.nodes
    a = start(net, node_a, tmp_path / "a")
    b = start(net, node_b, tmp_path / "b")
    try:
        a.ok("cluster", "init")
        b.ok("cluster", "join", a.ok("cluster", "invite").text.strip())
        a_id = str(a.status()["node_id"])
        assert wait_until(lambda: state_of(b, a_id) == "alive", 10, poll=0.2)

        net.cut(node_b)
        cut = time.monotonic()
        assert wait_until(
            lambda: state_of(b, a_id) == "unreachable", PEER_TIMEOUT_S + 2, poll=0.1
        ), b.log()[-2000:]
        assert time.monotonic() - cut <= PEER_TIMEOUT_S + 2
        # A goes on alone: a runner spawned, ready and killed that B has not seen.
        a.ok("run", str(demo_model()), "Hi", "--max-tokens", "4")
        a.ok("kill", "--all")
        want = replicated_stream(a, a_id)
        assert "RunnerStopped" in [k for _, _, k in want]

        net.restore(node_b)
        restored = time.monotonic()
        assert wait_until(
            lambda: replicated_stream(b, a_id) == want, PEER_TIMEOUT_S + 10, poll=0.2
        ), (
            replicated_stream(b, a_id),
            b.log()[-2000:],
        )
        assert time.monotonic() - restored <= PEER_TIMEOUT_S + 10
        seqs = [s for _, s, _ in want]
        assert seqs == sorted(set(seqs))
        assert wait_until(lambda: state_of(b, a_id) == "alive", PEER_TIMEOUT_S + 10, poll=0.2)
    finally:
        b.cleanup()
        a.cleanup()
