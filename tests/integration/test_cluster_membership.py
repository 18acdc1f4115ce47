"""Leaving, removal and renewal between real exods on loopback, each on its own 127.0.0.x.

A makes the cluster (it holds the CA key) and loads a model; B and C join through it. The tests
of this module run in order: C renews an aged certificate from A at start; the refusals
(`remove` of an unknown node 66, `leave` on the CA's node 64, `remove` elsewhere 75); A removes
B, after which A and C refuse B's calls and list B `removed`, and C goes on refusing B while A
is stopped, when C's `leave` exits 75 and C stays a member; with A back, C leaves: it is in no
cluster, its TLS files are gone, and A lists it removed. A's runner is the same through the
removal, and C's through its leaving.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from exod.cluster import pki, tls_store
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.errors import REASON_KEY
from exod.proto.exo.v1 import peer_pb2, peer_pb2_grpc
from tests.daemon import Daemon, LineReader, Result, wait_until
from tests.httpapi import free_port
from tests.models import demo_model

PEER_TIMEOUT_S = 2.0
LONG_RUN_TOKENS = "100000"


@dataclass
class Node:
    daemon: Daemon
    address: str
    peer_port: int

    @property
    def id(self) -> str:
        return str(self.daemon.status()["node_id"])

    @property
    def tls(self) -> Path:
        return self.daemon.home / "tls"


@dataclass
class Nodes:
    a: Node
    b: Node
    c: Node
    runner: tuple[str, int] = ("", 0)
    stream: tuple[subprocess.Popen[bytes], LineReader] | None = None  # A's long run


def own_model(node: Node) -> Path:
    """A model of this node's own: content no other node's runner runs (a member whose runner
    runs the same content would be where the plan sends this node's runs)."""
    return demo_model(seed=ord(node.address[-1]))


def long_run(node: Node) -> tuple[subprocess.Popen[bytes], LineReader]:
    """A run that streams tokens until it is interrupted, already generating."""
    proc = node.daemon.exoctl_bg(
        "run",
        str(own_model(node)),
        "Tell me a story",
        "--raw",
        "--json",
        "--max-tokens",
        LONG_RUN_TOKENS,
    )
    reader = LineReader(proc)
    reader.next(60)
    return proc, reader


def still_generating(stream: tuple[subprocess.Popen[bytes], LineReader] | None) -> None:
    """The long run streams on, uninterrupted."""
    assert stream is not None
    proc, reader = stream
    assert proc.poll() is None, "the long run ended"
    for _ in range(3):
        assert b'"type":"token"' in reader.next(10)


def _node(home: Path, address: str) -> Node:
    port = free_port()
    daemon = Daemon.create(
        home,
        EXOD_PEER_BIND=address,
        EXOD_PEER_PORT=str(port),
        EXOD_JOIN_PORT=str(free_port()),
        EXOD_PEER_TIMEOUT=str(PEER_TIMEOUT_S),
    )
    return Node(daemon, address, port)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    root = tmp_path_factory.mktemp("membership")
    made = Nodes(
        _node(root / "a", "127.0.0.2"),
        _node(root / "b", "127.0.0.3"),
        _node(root / "c", "127.0.0.4"),
    )
    try:
        for n in (made.a, made.b, made.c):
            n.daemon.start()
        yield made
    finally:
        for n in (made.a, made.b, made.c):
            n.daemon.cleanup()


def one_line_error(result: Result, code: int, *words: str) -> None:
    assert result.code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exoctl: "), result
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], result
    assert result.stdout == b"", result


def state_of(viewer: Node, node_id: str) -> str:
    for n in viewer.daemon.status()["nodes"]:
        if n["id"] == node_id:
            return str(n["state"])
    return "unlisted"


def live_runner(node: Node) -> tuple[str, int]:
    (runner,) = [r for r in node.daemon.status()["runners"] if r["state"] in ("ready", "running")]
    return runner["id"], runner["pid"]


def hello_as(caller: Node, files: dict[str, bytes], target: Node, target_id: str) -> Any:
    """Call target's Hello over mTLS with the caller's files: the reply, or the RpcError."""
    credentials = grpc.ssl_channel_credentials(
        files["ca.crt"], files["node.key"], files["node.crt"]
    )
    options = [("grpc.ssl_target_name_override", target_id)]
    endpoint = f"{target.address}:{target.peer_port}"
    with grpc.secure_channel(endpoint, credentials, options=options) as ch:
        request = peer_pb2.PeerHelloRequest(protocol_version=PROTOCOL_VERSION, node_id=caller.id)
        try:
            return peer_pb2_grpc.PeerStub(ch).Hello(request, timeout=10)
        except grpc.RpcError as e:
            return e


def files_of(node: Node) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in node.tls.iterdir() if not p.name.startswith(".")}


def refused_as_removed(answer: Any, removed_id: str) -> None:
    assert isinstance(answer, grpc.RpcError), answer
    call: Any = answer  # a grpc.Call too at run time
    assert call.code() == grpc.StatusCode.PERMISSION_DENIED, call
    assert (REASON_KEY, "permission_denied") in list(call.trailing_metadata())
    assert removed_id in call.details() and "removed" in call.details()


# --- a cluster of three ---------------------------------------------------------------------------


def test_b_and_c_join_while_a_holds_a_model(nodes: Nodes) -> None:
    a, b, c = nodes.a, nodes.b, nodes.c
    a.daemon.ok("cluster", "init")
    nodes.stream = long_run(a)
    nodes.runner = live_runner(a)
    for joiner in (b, c):
        joiner.daemon.ok("cluster", "join", a.daemon.ok("cluster", "invite").text.strip())
    b_id, c_id = b.id, c.id
    assert wait_until(lambda: state_of(c, b_id) == "alive", 15, poll=0.2)
    assert wait_until(lambda: state_of(b, c_id) == "alive", 15, poll=0.2)
    still_generating(nodes.stream)
    # Ended here: a run decoding without end on A's cores would slow the renewals that follow.
    nodes.stream[0].send_signal(signal.SIGINT)
    assert nodes.stream[0].wait(10) == 130


def test_a_member_renews_an_aged_certificate_from_the_ca_node_at_start(nodes: Nodes) -> None:
    a, c = nodes.a, nodes.c
    c_id, ca = c.id, files_of(a)
    c.daemon.stop()
    # Two thirds of its life gone (signed 50 minutes ago for an hour): due for renewal.
    mine = files_of(c)
    csr = pki.csr_for(mine["node.key"], c_id)
    aged = pki.sign_node(
        ca["ca.key"], ca["ca.crt"], csr, c_id, lifetime_s=3600, now=time.time() - 3000
    )
    assert pki.needs_renewal(aged, time.time())
    tls_store.write_pem(c.tls / "node.crt", aged, private=False)
    c.daemon.start()
    assert wait_until(lambda: (c.tls / "node.crt").read_bytes() != aged, 15, poll=0.2), (
        c.daemon.log()[-3000:]
    )
    renewed = (c.tls / "node.crt").read_bytes()
    assert pki.verify_node_cert(ca["ca.crt"], renewed, time.time()) == c_id
    assert not pki.needs_renewal(renewed, time.time())
    assert pki.key_matches(mine["node.key"], renewed)  # the same key: only the certificate is new
    assert "cert_expiring" not in {w["code"] for w in c.daemon.status()["warnings"]}
    # The peer port answers with the new certificate.
    answer = hello_as(a, ca, c, c_id)
    assert not isinstance(answer, grpc.RpcError) and answer.node_id == c_id


# --- refusals -------------------------------------------------------------------------------------


def test_remove_of_an_unknown_node_exits_66(nodes: Nodes) -> None:
    result = nodes.a.daemon.exoctl("cluster", "remove", "n-000000000000")
    one_line_error(result, 66, "n-000000000000", "not a member", "exoctl status")


def test_leave_on_the_ca_node_exits_64(nodes: Nodes) -> None:
    result = nodes.a.daemon.exoctl("cluster", "leave")
    one_line_error(result, 64, "the CA's node cannot leave its own cluster", "remove")
    assert nodes.a.daemon.status()["cluster"] is not None


def test_the_ca_node_cannot_be_removed_nor_a_member_remove_itself_64(nodes: Nodes) -> None:
    a, c = nodes.a, nodes.c
    one_line_error(a.daemon.exoctl("cluster", "remove", a.id), 64, "cannot remove itself")
    # Asked of the CA's node by C, which answers the same.
    one_line_error(c.daemon.exoctl("cluster", "remove", a.id), 64, "cannot remove itself")
    one_line_error(c.daemon.exoctl("cluster", "remove", c.id), 64, "`exoctl cluster leave`")
    one_line_error(c.daemon.exoctl("cluster", "remove", "n-0123456789ab"), 66, "not a member")
    assert not any(e["kind"] == "NodeRemoved" for e in a.daemon.events())


# --- removal --------------------------------------------------------------------------------------


def test_a_removed_node_is_refused_by_every_member(nodes: Nodes) -> None:
    a, b, c = nodes.a, nodes.b, nodes.c
    a_id, b_id, c_id = a.id, b.id, c.id
    b_files = files_of(b)
    removed = a.daemon.ok("cluster", "remove", b_id, "--json").json_lines()[0]
    assert removed["removed"] == b_id and removed["cluster"]["id"].startswith("c-")
    refused_as_removed(hello_as(b, b_files, a, a_id), b_id)
    assert state_of(a, b_id) == "removed"
    # The signed entry reaches C, which then refuses B too.
    assert wait_until(lambda: state_of(c, b_id) == "removed", 10, poll=0.2), c.daemon.log()[-2000:]
    refused_as_removed(hello_as(b, b_files, c, c_id), b_id)
    # Removing it again changes nothing and succeeds.
    assert a.daemon.ok("cluster", "remove", b_id).text.strip() == (
        f"removed {b_id} from cluster {a.daemon.status()['cluster']['id']}"
    )
    assert live_runner(a) == nodes.runner  # the model on A never noticed


def test_with_the_ca_node_stopped_c_still_refuses_b_and_cannot_leave(nodes: Nodes) -> None:
    a, b, c = nodes.a, nodes.b, nodes.c
    a_id, b_id, c_id = a.id, b.id, c.id
    on_c = long_run(c)
    runner = live_runner(c)
    a.daemon.stop()
    try:
        refused_as_removed(hello_as(b, files_of(b), c, c_id), b_id)
        one_line_error(c.daemon.exoctl("cluster", "leave"), 75, a_id, "did not answer", "retry")
        assert c.daemon.status()["cluster"] is not None
        assert (c.tls / "node.crt").exists()
        # Runs never need the CA's node: C's goes on, and a new one is served.
        still_generating(on_c)
        assert c.daemon.ok("run", str(own_model(c)), "hello", "--max-tokens", "2").code == 0
    finally:
        a.daemon.start()
    still_generating(on_c)
    assert live_runner(c) == runner
    on_c[0].send_signal(signal.SIGINT)
    assert on_c[0].wait(10) == 130


# --- leaving --------------------------------------------------------------------------------------


def test_c_leaves_and_is_in_no_cluster_with_its_model_still_loaded(nodes: Nodes) -> None:
    a, c = nodes.a, nodes.c
    c_id, cluster = c.id, c.daemon.status()["cluster"]
    c.daemon.ok("run", str(own_model(c)), "hello", "--max-tokens", "2")
    runner = live_runner(c)
    left = c.daemon.ok("cluster", "leave", "--json").json_lines()[0]
    assert left == {"left": cluster, "node_id": c_id}
    status = c.daemon.status()
    assert status["cluster"] is None
    # No member any more (mDNS may still list refused strangers: not members).
    assert [n["state"] for n in status["nodes"] if n["state"] != "refused"] == ["self"]
    assert [p.name for p in c.tls.iterdir() if p.suffix in (".crt", ".key")] == []
    assert wait_until(lambda: state_of(a, c_id) == "removed", 10, poll=0.2)
    one_line_error(c.daemon.exoctl("cluster", "leave"), 64, "in no cluster")
    assert live_runner(c) == runner  # leaving touches no runner
