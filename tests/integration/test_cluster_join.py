"""`exoctl cluster init / invite / join` between real exods on loopback: the join, the mTLS it
leads to, and every refusal a person can run into, each one line with its exit code.

The tests of this module share three nodes and run in order: A makes the cluster, B joins it,
C makes a cluster of its own, D (never in one) tries the tokens that must be refused.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from exod.cluster import invite, pki
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.proto.exo.v1 import peer_pb2, peer_pb2_grpc
from tests.daemon import Daemon, Result
from tests.httpapi import HOST, free_port

PEER_TIMEOUT_S = 2.0


@dataclass
class Node:
    daemon: Daemon
    peer_port: int
    join_port: int

    @property
    def tls(self) -> Path:
        return self.daemon.home / "tls"

    def listening(self) -> set[int]:
        conns = psutil.Process(self.daemon.pid).net_connections(kind="tcp")
        return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}


@dataclass
class Nodes:
    a: Node
    b: Node
    c: Node
    d: Node


def _node(home: Path) -> Node:
    peer, join = free_port(), free_port()
    daemon = Daemon.create(
        home,
        EXOD_PEER_BIND=HOST,
        EXOD_PEER_PORT=str(peer),
        EXOD_JOIN_PORT=str(join),
        EXOD_PEER_TIMEOUT=str(PEER_TIMEOUT_S),
    )
    return Node(daemon, peer, join)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    root = tmp_path_factory.mktemp("cluster")
    made = Nodes(*(_node(root / name) for name in "abcd"))
    all_ = (made.a, made.b, made.c, made.d)
    try:
        for n in all_:
            n.daemon.start()
        yield made
    finally:
        for n in all_:
            n.daemon.cleanup()


def refused(result: Result, code: int, *words: str) -> None:
    """Exit `code`, one line on stderr holding `words`, nothing on stdout, no traceback."""
    assert result.code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("exoctl: "), result
    for word in words:
        assert word in lines[0], result
    assert result.stdout == b"", result


def cluster_of(node: Node) -> dict[str, str] | None:
    cluster: dict[str, str] | None = node.daemon.status()["cluster"]
    return cluster


def hello(target: Node, trust: bytes, key: bytes | None, cert: bytes | None, name: str) -> str:
    """Call target's Hello over TLS as the holder of key/cert; its node id, or the gRPC code."""
    credentials = grpc.ssl_channel_credentials(trust, key, cert)
    options = [("grpc.ssl_target_name_override", name)]
    with grpc.secure_channel(f"{HOST}:{target.peer_port}", credentials, options=options) as ch:
        stub = peer_pb2_grpc.PeerStub(ch)
        request = peer_pb2.PeerHelloRequest(protocol_version=PROTOCOL_VERSION)
        try:
            reply = stub.Hello(request, timeout=10)
        except grpc.RpcError as e:
            return str(e.code())
    assert reply.memory_total_bytes > 0
    return reply.node_id


def files(node: Node) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in node.tls.iterdir() if not p.name.startswith(".")}


def node_id(node: Node) -> str:
    return str(node.daemon.status()["node_id"])


# --- outside a cluster ----------------------------------------------------------------------------


def test_a_node_in_no_cluster_listens_on_no_tcp_port(nodes: Nodes) -> None:
    assert nodes.a.listening() == set()  # EXOD_HTTP_PORT=0: no HTTP API either
    assert cluster_of(nodes.a) is None
    assert not nodes.a.tls.exists()


def test_invite_outside_a_cluster_is_64(nodes: Nodes) -> None:
    refused(nodes.a.daemon.exoctl("cluster", "invite"), 64, "`exoctl cluster init` first")


def test_a_garbled_token_is_64(nodes: Nodes) -> None:
    refused(nodes.d.daemon.exoctl("cluster", "join", "exo1-notatoken"), 64, "token")
    refused(nodes.d.daemon.exoctl("cluster", "join", "hello"), 64, "not an exod invite token")


# --- init, invite, join ---------------------------------------------------------------------------


def test_init_makes_the_cluster_and_opens_the_peer_port(nodes: Nodes) -> None:
    a = nodes.a
    made = a.daemon.ok("cluster", "init", "--json").json_lines()[0]
    ca = (a.tls / "ca.crt").read_bytes()
    assert made["cluster"] == {"id": pki.cert_info(ca).name, "ca_fingerprint": pki.fingerprint(ca)}
    assert made["node_id"] == node_id(a)
    assert cluster_of(a) == made["cluster"]
    assert a.listening() == {a.peer_port, a.join_port}
    assert (a.tls / "ca.key").stat().st_mode & 0o077 == 0


def test_a_second_init_is_64(nodes: Nodes) -> None:
    refused(
        nodes.a.daemon.exoctl("cluster", "init"),
        64,
        "already belongs to cluster",
        "`exoctl cluster invite`",
    )


def test_join_with_an_invite(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    token = a.daemon.ok("cluster", "invite").text
    assert token.endswith("\n") and token.count("\n") == 1 and token.startswith("exo1-")
    joined = b.daemon.ok("cluster", "join", token.strip(), "--json").json_lines()[0]
    assert joined["cluster"] == cluster_of(a) == cluster_of(b)
    # B's certificate is A's CA's, for B's own id and key (made on B, never sent).
    ca = (a.tls / "ca.crt").read_bytes()
    assert pki.verify_node_cert(ca, (b.tls / "node.crt").read_bytes(), time.time()) == node_id(b)
    assert set(files(b)) == {"ca.crt", "node.key", "node.crt"}  # no CA key
    assert b.listening() == {b.peer_port, b.join_port}  # every member can invite
    kinds = [e["kind"] for e in a.daemon.events()]
    assert "InviteIssued" in kinds and "NodeJoined" in kinds


def test_a_member_calls_hello_over_mutual_tls(nodes: Nodes) -> None:
    a, b = nodes.a, nodes.b
    mine = files(b)
    assert hello(a, mine["ca.crt"], mine["node.key"], mine["node.crt"], node_id(a)) == node_id(a)
    theirs = files(a)
    assert hello(b, theirs["ca.crt"], theirs["node.key"], theirs["node.crt"], node_id(b)) == (
        node_id(b)
    )


def test_a_peer_of_another_major_protocol_version_is_refused_naming_both(nodes: Nodes) -> None:
    a, mine = nodes.a, files(nodes.b)
    credentials = grpc.ssl_channel_credentials(mine["ca.crt"], mine["node.key"], mine["node.crt"])
    options = [("grpc.ssl_target_name_override", node_id(a))]
    with (
        grpc.secure_channel(f"{HOST}:{a.peer_port}", credentials, options=options) as ch,
        pytest.raises(grpc.RpcError) as caught,
    ):
        peer_pb2_grpc.PeerStub(ch).Hello(peer_pb2.PeerHelloRequest(protocol_version="2.0"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"speaks peer protocol 2.0, this exod speaks {PROTOCOL_VERSION}" in str(
        caught.value.details()
    )


def test_a_client_without_a_certificate_cannot_call(nodes: Nodes) -> None:
    a = nodes.a
    ca = files(a)["ca.crt"]
    assert hello(a, ca, None, None, node_id(a)) == str(grpc.StatusCode.UNAVAILABLE)
    # The join port serves no one's Hello: it holds no client certificate to check.
    credentials = grpc.ssl_channel_credentials(ca)
    options = [("grpc.ssl_target_name_override", node_id(a))]
    with (
        grpc.secure_channel(f"{HOST}:{a.join_port}", credentials, options=options) as ch,
        pytest.raises(grpc.RpcError) as caught,
    ):
        peer_pb2_grpc.PeerStub(ch).Hello(
            peer_pb2.PeerHelloRequest(protocol_version=PROTOCOL_VERSION), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_node_of_another_cluster_cannot_call(nodes: Nodes) -> None:
    a, c = nodes.a, nodes.c
    c.daemon.ok("cluster", "init")
    assert cluster_of(c) != cluster_of(a)
    other = files(c)
    # Trusting A's CA, with C's certificate: A refuses it in the handshake.
    ca = files(a)["ca.crt"]
    code = hello(a, ca, other["node.key"], other["node.crt"], node_id(a))
    assert code == str(grpc.StatusCode.UNAVAILABLE)


# --- refusals -------------------------------------------------------------------------------------


def test_a_used_token_is_77(nodes: Nodes) -> None:
    a, c, d = nodes.a, nodes.c, nodes.d
    token = a.daemon.ok("cluster", "invite").text.strip()
    # C is a member (of its own cluster): 64, and the token is not spent by that.
    refused(c.daemon.exoctl("cluster", "join", token), 64, "already belongs to cluster")
    d.daemon.ok("cluster", "join", token)
    # D used it; a node that tries it again is refused (E: a fresh home on D's settings).
    e = _node(d.daemon.home.parent / "e")
    try:
        e.daemon.start()
        refused(e.daemon.exoctl("cluster", "join", token), 77, "used already", "invite")
        assert cluster_of(e) is None and e.listening() == set()
    finally:
        e.daemon.cleanup()


def test_an_expired_token_is_77(nodes: Nodes, tmp_path: Path) -> None:
    token = nodes.a.daemon.ok("cluster", "invite", "--ttl", "1s").text.strip()
    time.sleep(1.1)
    e = _node(tmp_path / "e")
    try:
        e.daemon.start()
        refused(e.daemon.exoctl("cluster", "join", token), 77, "expired")
    finally:
        e.daemon.cleanup()


def test_join_while_a_member_is_64(nodes: Nodes) -> None:
    token = nodes.a.daemon.ok("cluster", "invite").text.strip()
    refused(nodes.b.daemon.exoctl("cluster", "join", token), 64, "already belongs to cluster")


def test_a_node_joins_through_a_member_without_the_ca_key(nodes: Nodes, tmp_path: Path) -> None:
    a, b = nodes.a, nodes.b
    token = b.daemon.ok("cluster", "invite", "--ttl", "10m").text.strip()
    # The token names B (its join port), not the CA's node.
    assert invite.decode(token).port == b.join_port
    e = _node(tmp_path / "e")
    try:
        e.daemon.start()
        joined = e.daemon.ok("cluster", "join", token, "--json").json_lines()[0]
        assert joined["cluster"] == cluster_of(a)
        ca = (a.tls / "ca.crt").read_bytes()
        cert = (e.tls / "node.crt").read_bytes()
        assert pki.verify_node_cert(ca, cert, time.time()) == node_id(e)
        # The CA's node made the secret for B and signed E's certificate, through B.
        events = a.daemon.events()
        issued = [x for x in events if x["kind"] == "InviteIssued" and x.get("inviter")]
        assert [x["inviter"] for x in issued] == [node_id(b)]
        (via,) = [x for x in events if x["kind"] == "NodeJoined" and x["node_id"] == node_id(e)]
        assert via["via"] == node_id(b)
        # E knows the CA's node (not B) as the one to ask for leave and renewal.
        (entered,) = [
            x
            for x in e.daemon.events()
            if x["kind"] == "ClusterEntered" and x["origin"] == node_id(e)
        ]
        assert entered["ca_node_id"] == node_id(a)
        # The CA's node keeps the invite: used once, refused through B as through A.
        f = _node(tmp_path / "f")
        try:
            f.daemon.start()
            refused(f.daemon.exoctl("cluster", "join", token), 77, "used already")
        finally:
            f.daemon.cleanup()
        # E is on its way out again: the CA's node removes it at B's request.
        removed = b.daemon.ok("cluster", "remove", node_id(e), "--json").json_lines()[0]
        assert removed["removed"] == node_id(e)
        assert any(
            x["kind"] == "NodeRemoved" and x["node_id"] == node_id(e) for x in a.daemon.events()
        )
    finally:
        e.daemon.cleanup()


def test_a_member_cannot_invite_or_remove_while_the_ca_node_is_down_75_naming_it(
    nodes: Nodes, tmp_path: Path
) -> None:
    a, b = nodes.a, nodes.b
    a_id = node_id(a)
    token = b.daemon.ok("cluster", "invite").text.strip()
    a.daemon.stop()
    e = _node(tmp_path / "e")
    try:
        ca = f"the CA's node {a_id}"
        refused(b.daemon.exoctl("cluster", "invite"), 75, ca, "make an invite", "nothing changed")
        refused(b.daemon.exoctl("cluster", "remove", "n-000000000000"), 75, ca, "did not answer")
        # A token B made while A was up: E hears from B why it cannot join now.
        e.daemon.start()
        started = time.monotonic()
        refused(e.daemon.exoctl("cluster", "join", token), 75, "passes joins on to the CA's node")
        assert time.monotonic() - started < PEER_TIMEOUT_S + 2
        assert cluster_of(e) is None
        a.daemon.start()
        # Nothing was spent: the same token works once the CA's node is back.
        joined = e.daemon.ok("cluster", "join", token, "--json").json_lines()[0]
        assert joined["cluster"] == cluster_of(a)
    finally:
        e.daemon.cleanup()
        if not a.daemon.alive():
            a.daemon.start()


def test_an_inviter_that_never_answers_is_75_within_the_peer_timeout(
    nodes: Nodes, tmp_path: Path
) -> None:
    """A port that accepts connections and then says nothing (a wedged machine)."""
    cluster = cluster_of(nodes.a)
    assert cluster is not None
    fingerprint = cluster["ca_fingerprint"]
    e = _node(tmp_path / "e")
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen()
        made = invite.new_invite([HOST], silent.getsockname()[1], fingerprint, 600, time.time())
        try:
            e.daemon.start()
            started = time.monotonic()
            refused(e.daemon.exoctl("cluster", "join", invite.encode(made)), 75, "did not answer")
            assert PEER_TIMEOUT_S - 0.5 < time.monotonic() - started < PEER_TIMEOUT_S + 2
        finally:
            e.daemon.cleanup()


# --- restarts -------------------------------------------------------------------------------------


def test_a_member_stays_one_across_a_restart(nodes: Nodes) -> None:
    b = nodes.b
    before = cluster_of(b)
    b.daemon.stop()
    b.daemon.start()
    assert cluster_of(b) == before
    # Listening as soon as exod answers: its control socket accepts last.
    assert b.listening() == {b.peer_port, b.join_port}


def test_an_inviter_that_is_down_is_75_then_its_token_works_after_a_restart(
    nodes: Nodes, tmp_path: Path
) -> None:
    a = nodes.a
    token = a.daemon.ok("cluster", "invite").text.strip()
    a.daemon.stop()
    e = _node(tmp_path / "e")
    try:
        e.daemon.start()
        started = time.monotonic()
        refused(
            e.daemon.exoctl("cluster", "join", token), 75, "did not answer", "EXOD_PEER_TIMEOUT"
        )
        assert time.monotonic() - started < PEER_TIMEOUT_S + 2
        a.daemon.start()
        joined = e.daemon.ok("cluster", "join", token, "--json").json_lines()[0]
        assert joined["cluster"] == cluster_of(a)
    finally:
        e.daemon.cleanup()


# --- refusing to start ----------------------------------------------------------------------------


def start_refused(node: Node) -> str:
    """Start the node's exod, which must refuse with 78: its one line."""
    daemon = node.daemon
    daemon.env["EXOD_LOG_LEVEL"] = "error"
    mark = len(daemon.log())
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 78, daemon.log()
    said = daemon.log()[mark:]
    assert "Traceback" not in said, said
    lines = said.splitlines()
    assert len(lines) == 1, said
    (line,) = lines
    assert line.startswith("exod: "), line
    return line


def test_a_taken_peer_port_or_a_damaged_certificate_refuses_the_start(nodes: Nodes) -> None:
    b = nodes.b
    b.daemon.stop()
    with socket.socket() as taken:
        # As exod binds: A's follower's connections to B's port linger in TIME_WAIT after B
        # stopped, which only a plain bind would mind.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind((HOST, b.peer_port))
        taken.listen()
        line = start_refused(b)
    assert f"cannot listen on {HOST}:{b.peer_port} (the peer port): " in line
    assert "set EXOD_PEER_PORT to a free port" in line
    cert = b.tls / "node.crt"
    good = cert.read_bytes()
    cert.write_bytes(b"not a certificate")
    try:
        line = start_refused(b)
        assert f"{cert} is damaged" in line and "restore" in line
    finally:
        cert.write_bytes(good)
    b.daemon.env.pop("EXOD_LOG_LEVEL")
    b.daemon.start()
    # Listening as soon as exod answers: its control socket accepts last.
    assert b.listening() == {b.peer_port, b.join_port}
