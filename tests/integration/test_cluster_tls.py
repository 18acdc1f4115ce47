"""The cluster's certificates in real gRPC mutual TLS, on loopback: a node of the cluster gets in,
anyone else fails the handshake, and the server can tell which node called."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from exod.cluster import pki
from exod.errors import ExoError

YEAR = 365 * 86400
SERVER = "n-aaaaaaaaaaaa"
CLIENT = "n-bbbbbbbbbbbb"
WHO = "/exo.test.Who/Ask"


@dataclass(frozen=True)
class Identity:
    key: bytes
    cert: bytes


@dataclass(frozen=True)
class Cluster:
    ca_key: bytes
    ca_cert: bytes

    def node(self, node_id: str, now: float, lifetime_s: int = YEAR) -> Identity:
        key = pki.new_node_key()
        csr = pki.csr_for(key, node_id)
        cert = pki.sign_node(
            self.ca_key,
            self.ca_cert,
            csr,
            node_id,
            lifetime_s=lifetime_s,
            now=now,
            addresses=("127.0.0.1",),
        )
        return Identity(key, cert)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return Cluster(*pki.new_ca("c-111111111111", 10 * YEAR, time.time()))


@pytest.fixture(scope="module")
def other() -> Cluster:
    return Cluster(*pki.new_ca("c-222222222222", 10 * YEAR, time.time()))


def _who(ca_cert: bytes) -> grpc.GenericRpcHandler[bytes, bytes]:
    """What the peer interceptor will do: read the caller's certificate, verify it, name it."""

    def ask(request: bytes, context: grpc.ServicerContext) -> bytes:
        # A list of PEMs per key (grpc-stubs says bytes): the caller's certificate, once.
        pems = cast("list[bytes]", context.auth_context().get("x509_pem_cert", []))
        try:
            return pki.verify_node_cert(ca_cert, pems[0], time.time()).encode()
        except (ExoError, IndexError) as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))

    handler = grpc.unary_unary_rpc_method_handler(ask)
    return grpc.method_handlers_generic_handler("exo.test.Who", {"Ask": handler})


@pytest.fixture(scope="module")
def server(cluster: Cluster) -> Iterator[int]:
    """A peer server of `cluster` on 127.0.0.1, requiring a client certificate; its port."""
    me = cluster.node(SERVER, time.time())
    credentials = grpc.ssl_server_credentials(
        [(me.key, me.cert)], root_certificates=cluster.ca_cert, require_client_auth=True
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), srv)
    srv.add_generic_rpc_handlers((_who(cluster.ca_cert),))
    port = srv.add_secure_port("127.0.0.1:0", credentials)
    srv.start()
    yield port
    srv.stop(None)


def channel(port: int, trust: bytes, me: Identity | None, expect: str = SERVER) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trust,
        private_key=me.key if me else None,
        certificate_chain=me.cert if me else None,
    )
    # The client pins the node it means to reach: the server's certificate must name it.
    options = [("grpc.ssl_target_name_override", expect)]
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


def check(port: int, trust: bytes, me: Identity | None, expect: str = SERVER) -> grpc.StatusCode:
    with channel(port, trust, me, expect) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


def test_a_node_of_the_cluster_gets_in(server: int, cluster: Cluster) -> None:
    assert check(server, cluster.ca_cert, cluster.node(CLIENT, time.time())) == grpc.StatusCode.OK


def test_a_node_of_another_cluster_fails_the_handshake(
    server: int, cluster: Cluster, other: Cluster
) -> None:
    stranger = other.node(CLIENT, time.time())
    assert check(server, cluster.ca_cert, stranger) == grpc.StatusCode.UNAVAILABLE


def test_a_client_without_a_certificate_fails_the_handshake(server: int, cluster: Cluster) -> None:
    assert check(server, cluster.ca_cert, None) == grpc.StatusCode.UNAVAILABLE


def test_an_expired_certificate_fails_the_handshake(server: int, cluster: Cluster) -> None:
    lapsed = cluster.node(CLIENT, time.time() - 2 * 86400, lifetime_s=86400)
    assert check(server, cluster.ca_cert, lapsed) == grpc.StatusCode.UNAVAILABLE


def test_a_client_of_another_cluster_does_not_trust_this_server(
    server: int, cluster: Cluster, other: Cluster
) -> None:
    """Both ways: a node of another cluster refuses this server as well."""
    assert check(server, other.ca_cert, other.node(CLIENT, time.time())) == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_the_client_reaches_only_the_node_it_names(server: int, cluster: Cluster) -> None:
    me = cluster.node(CLIENT, time.time())
    assert check(server, cluster.ca_cert, me, expect="n-cccccccccccc") == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_the_server_reads_the_callers_node_id_from_its_certificate(
    server: int, cluster: Cluster
) -> None:
    with channel(server, cluster.ca_cert, cluster.node(CLIENT, time.time())) as ch:
        assert ch.unary_unary(WHO, None, None)(b"", timeout=10) == CLIENT.encode()
