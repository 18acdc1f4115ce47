"""Replicated event logs between real exods on loopback, each on its own 127.0.0.x address.

A makes the cluster and runs a model; B joins; the tests of this module run in order: B copies
A's stream without a gap or a duplicate, catches up after its own restart and after A's, lists
A as alive and then unreachable within EXOD_PEER_TIMEOUT + 2 s of A being stopped (SIGSTOP);
a third node C joins through A and every node lists the others. A's model keeps generating,
untouched, while B joins and while B is down.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, LineReader, Result, Stream, replicated_stream, wait_until
from tests.httpapi import free_port
from tests.models import copy_model, demo_model

PEER_TIMEOUT_S = 2.0
# More than it can generate while the tests run: it ends only when the test interrupts it.
LONG_RUN_TOKENS = "100000"


@dataclass
class Node:
    daemon: Daemon
    address: str

    @property
    def id(self) -> str:
        return str(self.daemon.status()["node_id"])


@dataclass
class Nodes:
    a: Node
    b: Node
    c: Node
    # A's long generation, started as B joins and ended once B has restarted.
    run: subprocess.Popen[bytes] | None = None
    reader: LineReader | None = None
    runner: tuple[str, int] = ("", 0)


def _node(home: Path, address: str) -> Node:
    daemon = Daemon.create(
        home,
        EXOD_PEER_BIND=address,
        EXOD_PEER_PORT=str(free_port()),
        EXOD_JOIN_PORT=str(free_port()),
        EXOD_PEER_TIMEOUT=str(PEER_TIMEOUT_S),
    )
    return Node(daemon, address)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    root = tmp_path_factory.mktemp("replication")
    made = Nodes(
        _node(root / "a", "127.0.0.2"),
        _node(root / "b", "127.0.0.3"),
        _node(root / "c", "127.0.0.4"),
    )
    try:
        made.a.daemon.start()
        made.b.daemon.start()
        yield made
    finally:
        for n in (made.a, made.b, made.c):
            if n.daemon.alive():
                n.daemon.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]  # alive: started
            n.daemon.cleanup()


def stream_of(holder: Node, origin: str) -> Stream:
    """(origin, origin_seq, kind) of origin's replicated events in holder's log, in log order."""
    return replicated_stream(holder.daemon, origin)


def caught_up(follower: Node, origin: Node, timeout: float = 10.0) -> Stream:
    """Wait until follower holds origin's replicated stream as origin holds it; that stream."""
    origin_id = origin.id
    want: Stream = []

    def same() -> bool:
        nonlocal want
        want = stream_of(origin, origin_id)
        return stream_of(follower, origin_id) == want

    held = stream_of(follower, origin_id)
    assert wait_until(same, timeout, poll=0.2), (
        f"{follower.id} holds {held}\nof {want}\n{follower.daemon.log()[-3000:]}"
    )
    seqs = [s for _, s, _ in want]
    assert seqs == sorted(set(seqs)), "out of order or duplicated"
    return want


def node_view(viewer: Node, node_id: str) -> dict[str, Any]:
    for n in viewer.daemon.status()["nodes"]:
        if n["id"] == node_id:
            found: dict[str, Any] = n
            return found
    raise AssertionError(f"{node_id} not listed by {viewer.id}: {viewer.daemon.status()['nodes']}")


def state_of(viewer: Node, node_id: str) -> str:
    return str(node_view(viewer, node_id)["state"])


def live_runner(node: Node) -> tuple[str, int]:
    (runner,) = [r for r in node.daemon.status()["runners"] if r["state"] in ("ready", "running")]
    return runner["id"], runner["pid"]


def generating(nodes: Nodes) -> None:
    """A's long run still streams tokens, from the runner it started on."""
    assert nodes.run is not None and nodes.reader is not None
    assert nodes.run.poll() is None, "the long run ended"
    for _ in range(3):
        assert b'"type":"token"' in nodes.reader.next(10)
    assert live_runner(nodes.a) == nodes.runner


def finish(proc: subprocess.Popen[bytes]) -> Result:
    out, err = proc.communicate(timeout=60)
    return Result(proc.returncode, out, err.decode(errors="replace"))


# --- joining --------------------------------------------------------------------------------------


def test_b_joins_while_a_generates_and_copies_as_stream(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    a.daemon.ok("cluster", "init")
    model = str(demo_model())
    nodes.run = a.daemon.exoctl_bg(
        "run", model, "Tell me a story", "--raw", "--json", "--max-tokens", LONG_RUN_TOKENS
    )
    nodes.reader = LineReader(nodes.run)
    nodes.reader.next(60)  # generating
    before = nodes.runner = live_runner(a)
    token = a.daemon.ok("cluster", "invite").text.strip()
    b.daemon.ok("cluster", "join", token)
    stream = caught_up(b, a)
    kinds = [k for _, _, k in stream]
    assert {"NodeStarted", "ClusterEntered", "RunnerSpawned", "RunnerReady", "NodeJoined"} <= set(
        kinds
    )
    # A's local facts stay on A: no run, model or invite of A's is in B's log.
    theirs = b.daemon.ok("events", "--json", "--node", a.id).json_lines()
    assert not {e["kind"] for e in theirs} & {
        "RunAccepted",
        "RunFinished",
        "ModelAdded",
        "InviteIssued",
    }
    # Another node's runner is not B's.
    assert b.daemon.status()["runners"] == []
    # A node B does not know has no events: nothing, and success.
    assert b.daemon.ok("events", "--node", "n-000000000000").stdout == b""
    assert live_runner(a) == before  # the same runner, never restarted
    generating(nodes)


def test_each_lists_the_other_alive_with_its_runners(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    assert wait_until(lambda: state_of(b, a.id) == "alive", 10, poll=0.2)
    seen = node_view(b, a.id)
    assert seen["runners"] == 1
    assert seen["memory_total_bytes"] > 0 and seen["last_seen"] is not None
    assert seen["addresses"] == [a.address]
    assert wait_until(lambda: state_of(a, b.id) == "alive", 10, poll=0.2)
    nodes_of_b = b.daemon.status()["nodes"]
    assert nodes_of_b[0]["id"] == b.id and nodes_of_b[0]["state"] == "self"
    assert nodes_of_b[0]["last_seen"] is None
    table = b.daemon.ok("status").text
    assert "NODES" in table and a.id in table


# --- restarts -------------------------------------------------------------------------------------


def test_b_catches_up_after_its_restart_and_a_keeps_generating(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    b.daemon.stop()
    generating(nodes)
    # Meanwhile A spawns and stops a second runner: events B has not seen.
    other = copy_model()
    a.daemon.ok("run", str(other), "Hi", "--max-tokens", "4")
    second = [r["id"] for r in a.daemon.status()["runners"] if r["model"] == str(other)]
    a.daemon.ok("kill", second[0])
    b.daemon.start()
    stream = caught_up(b, a)
    assert "RunnerStopped" in [k for _, _, k in stream]
    generating(nodes)
    # The long run ends only when asked: Ctrl-C, 130, and it never broke off before.
    assert nodes.run is not None
    nodes.run.send_signal(signal.SIGINT)
    result = finish(nodes.run)
    assert result.code == 130, result


def test_b_catches_up_after_a_restarts(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    a.daemon.stop()
    a.daemon.start()
    stream = caught_up(b, a, timeout=PEER_TIMEOUT_S + 10)
    assert [k for _, _, k in stream][-2:] == ["NodeStopped", "NodeStarted"]
    assert wait_until(lambda: state_of(b, a.id) == "alive", PEER_TIMEOUT_S + 10, poll=0.2)
    assert node_view(b, a.id)["runners"] == 0  # its runners ended with it


# --- liveness -------------------------------------------------------------------------------------


def test_a_stopped_member_is_unreachable_within_the_peer_timeout_and_alive_after(
    nodes: Nodes,
) -> None:
    a, b = nodes.a, nodes.b
    a_id = a.id
    assert wait_until(lambda: state_of(b, a_id) == "alive", 10, poll=0.2)
    assert a.daemon.proc is not None
    a.daemon.proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        assert wait_until(lambda: state_of(b, a_id) == "unreachable", PEER_TIMEOUT_S + 2, poll=0.1)
        assert time.monotonic() - stopped <= PEER_TIMEOUT_S + 2
    finally:
        a.daemon.proc.send_signal(signal.SIGCONT)
    assert wait_until(lambda: state_of(b, a_id) == "alive", PEER_TIMEOUT_S + 10, poll=0.2)


# --- a third node ---------------------------------------------------------------------------------


def test_a_third_node_joins_through_a_and_every_node_lists_the_others(nodes: Nodes) -> None:
    a, b, c = nodes.a, nodes.b, nodes.c
    c.daemon.start()
    token = a.daemon.ok("cluster", "invite").text.strip()
    c.daemon.ok("cluster", "join", token)
    ids = {a.id, b.id, c.id}
    for viewer in (a, b, c):
        others = ids - {viewer.id}

        def lists(viewer: Node = viewer, others: set[str] = others) -> bool:
            listed = {n["id"]: n["state"] for n in viewer.daemon.status()["nodes"]}
            return all(listed.get(i) == "alive" for i in others)

        assert wait_until(lists, 10, poll=0.2), (viewer.id, viewer.daemon.status()["nodes"])
    caught_up(c, a)
    caught_up(c, b)
    caught_up(b, c)
    # C learned its members from the join: they survive its restart without asking anyone.
    c.daemon.stop()
    c.daemon.start()
    listed = {n["id"] for n in c.daemon.status()["nodes"]}
    assert listed == ids


# --- a restored home ------------------------------------------------------------------------------


def test_a_home_restored_from_a_backup_is_told_and_refused(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    b_id = b.id
    caught_up(a, b)
    b.daemon.stop()
    backup = b.daemon.home.parent / "b-backup"
    shutil.copytree(b.daemon.home, backup)
    # B lives on after the backup: A copies its new events (a restart's stop and start).
    b.daemon.start()
    caught_up(a, b)
    b.daemon.stop()
    # Then B's home is restored from the backup: A holds more of B's stream than B does.
    shutil.rmtree(b.daemon.home)
    backup.rename(b.daemon.home)
    b.daemon.start()

    def warned() -> bool:
        codes = [w["code"] for w in b.daemon.status()["warnings"]]
        return "copied_home" in codes

    assert wait_until(warned, PEER_TIMEOUT_S + 10, poll=0.2), b.daemon.log()[-2000:]
    (warning,) = [w for w in b.daemon.status()["warnings"] if w["code"] == "copied_home"]
    # Whichever member answers its Hello first tells it (C too, when the module started it).
    assert any(f"member {m.id} holds event" in warning["message"] for m in (a, nodes.c))
    assert "move EXOD_HOME aside" in warning["message"]

    def refused() -> bool:
        seen = node_view(a, b_id)
        return bool(seen["state"] == "refused" and seen["reason"] == "duplicate_id")

    assert wait_until(refused, PEER_TIMEOUT_S + 10, poll=0.2), node_view(a, b_id)
    assert "refused (duplicate_id)" in a.daemon.ok("status").text

    # And B writes nothing more under its id: each command that would is refused, 78, saying why.
    def own_events() -> int:
        return sum(1 for e in b.daemon.events() if e["origin"] == b_id)

    before = own_events()
    for args, doing in (
        (("run", "tiny", "Hello"), "accept runs"),
        (("models", "add", "tiny", str(b.daemon.home)), "change its models"),
        (("cluster", "leave"), "leave its cluster"),
    ):
        result = b.daemon.exoctl(*args)
        assert result.code == 78, result
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"exoctl: this node does not {doing}: member "), line
        assert "move EXOD_HOME aside" in line
    assert own_events() == before
