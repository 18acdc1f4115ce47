"""The joiner's side of Join: find the inviter, check its CA against the invite, prove the
secret, and check the answer before any of it is kept.

The joiner has no CA certificate yet, only the invite's fingerprint of it. So it first opens a
TLS connection without verifying and reads the certificate chain the join port presents (the
inviter's certificate and the CA's); only a CA whose SHA-256 is the invite's is trusted, and the
Join call itself then runs over gRPC TLS verified under that CA, pinned to the inviter's node id.
The secret is therefore sent only to a server that holds a certificate of the invited cluster.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from dataclasses import dataclass
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exod.cluster import addresses, invite, pki, tls_store
from exod.cluster.invite import Invite
from exod.cluster.peer_server import KEEPALIVE, endpoint
from exod.cluster.protocol import PROTOCOL_VERSION, check_version
from exod.errors import ExoError, from_peer
from exod.proto.exo.v1 import events_pb2, peer_pb2, peer_pb2_grpc


@dataclass(frozen=True)
class Inviter:
    address: str
    ca_cert: bytes
    node_id: str  # what the join port's certificate names: the TLS target of the Join call


def _chain(address: str, port: int, timeout: float) -> list[bytes]:
    """The DER certificates the TLS server at address:port presents, unverified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verified below, by the invite's fingerprint
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((address, port), timeout=timeout) as raw,
        context.wrap_socket(raw) as tls,
    ):
        # Public from Python 3.13; the same method on the inner object before.
        owner: object = tls if hasattr(tls, "get_unverified_chain") else getattr(tls, "_sslobj")  # noqa: B009  # private before 3.13, untyped
        certs = cast("list[object]", getattr(owner, "get_unverified_chain")() or [])  # noqa: B009
    return [c if isinstance(c, bytes) else _der(c) for c in certs]


def _der(cert: object) -> bytes:
    public_bytes = getattr(cert, "public_bytes")  # noqa: B009  # _ssl.Certificate, untyped
    return cast("bytes", public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]  # _ssl is untyped


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def find_inviter(invite: Invite, timeout: float) -> Inviter:
    """The first of the invite's addresses whose join port presents the invited CA; ExoError
    peer_unreachable (none answered within `timeout` in all) or permission_denied (a server
    answered with another CA)."""
    deadline = time.monotonic() + timeout
    wrong: ExoError | None = None
    for address in invite.addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            chain = _chain(address, invite.port, left)
        except (OSError, ValueError):
            continue
        for der in chain[1:]:
            try:
                pem = _pem(der)
                pki.check_ca(pem, invite.ca_fingerprint)
            except (ValueError, ExoError) as e:
                wrong = e if isinstance(e, ExoError) else wrong
                continue
            leaf = x509.load_der_x509_certificate(chain[0])
            names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            node_id = str(names[0].value) if names else ""
            return Inviter(address=address, ca_cert=pem, node_id=node_id)
        if not chain[1:]:
            wrong = ExoError(
                "permission_denied",
                f"{endpoint(address, invite.port)} is not an exod join port (it showed no CA "
                "certificate): check the address, or ask for a new invite",
            )
    if wrong is not None:
        raise wrong
    where = ", ".join(endpoint(a, invite.port) for a in invite.addresses)
    raise ExoError(
        "peer_unreachable",
        f"the inviter did not answer at {where} within {timeout:g}s (EXOD_PEER_TIMEOUT): is its "
        "exod running (`exoctl status` there), and can this machine reach it? retry then, or ask "
        "a reachable member for a new invite",
    )


async def join(
    invite: Invite,
    request: peer_pb2.JoinRequest,
    timeout: float,  # noqa: ASYNC109  # one bound for the TLS probe and the call together
) -> tuple[Inviter, peer_pb2.JoinReply]:
    """Join the cluster the invite names; the inviter and its answer. ExoError when refused."""
    started = time.monotonic()
    inviter = await asyncio.to_thread(find_inviter, invite, timeout)
    left = max(timeout - (time.monotonic() - started), 1.0)
    credentials = grpc.ssl_channel_credentials(root_certificates=inviter.ca_cert)
    options = [("grpc.ssl_target_name_override", inviter.node_id), *KEEPALIVE]
    target = endpoint(inviter.address, invite.port)
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        request.protocol_version = PROTOCOL_VERSION
        try:
            reply = await stub.Join(request, timeout=left)
        except grpc.aio.AioRpcError as e:
            raise _refusal(e, target, timeout) from None
    check_version(reply.protocol_version, f"the inviter {inviter.node_id}")
    return inviter, reply


@dataclass(frozen=True)
class Joined:
    """What a join brings: the files to keep, and what to log."""

    material: tls_store.Material
    entered: events_pb2.ClusterEntered
    learned: events_pb2.MembersLearned  # the members the CA's node knows, for restarts
    inviter: str  # the node whose join port answered


async def join_with(token: str, me: peer_pb2.Member, timeout: float) -> Joined:  # noqa: ASYNC109  # EXOD_PEER_TIMEOUT for the probe and the call together
    """Join the cluster `token` invites to as `me` (id, name, peer addresses and port), with a
    key made here; ExoError when the token, the inviter or its answer is refused."""
    inv = invite.decode(token)
    if invite.expired(inv, time.time()):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(inv.expires))
        raise ExoError(
            "invite_refused",
            f"the invite expired at {when}: "
            "ask a member for a new one with `exoctl cluster invite`",
        )
    node_key = pki.new_node_key()
    request = peer_pb2.JoinRequest(
        node_id=me.id,
        name=me.name,
        csr=pki.csr_for(node_key, me.id),
        secret=inv.secret,
        addresses=me.addresses,
        port=me.port,
    )
    inviter, reply = await join(inv, request, timeout)
    # Trust nothing in the answer that the invite does not vouch for.
    cluster_id = pki.check_ca(reply.ca_cert, inv.ca_fingerprint)
    pki.verify_node_cert(reply.ca_cert, reply.node_cert, time.time())
    if pki.cert_info(reply.node_cert).name != me.id or not pki.key_matches(
        node_key, reply.node_cert
    ):
        raise ExoError(
            "permission_denied",
            "the inviter sent a certificate for another node or key: ask for a new invite",
        )
    entered = events_pb2.ClusterEntered(
        cluster_id=cluster_id,
        ca_fingerprint=inv.ca_fingerprint,
        how="join",
        ca_node_id=ca_node_of(reply, inviter),
        ca_cert=reply.ca_cert,
    )
    learned = events_pb2.MembersLearned(
        members=[
            events_pb2.KnownMember(
                node_id=m.id,
                name=m.name[:63],
                addresses=m.addresses[: addresses.MAX_ADDRESSES],
                port=m.port,
            )
            for m in reply.members
            if m.id and m.id != me.id
        ]
    )
    material = tls_store.Material(
        ca_cert=reply.ca_cert, node_key=node_key, node_cert=reply.node_cert
    )
    return Joined(material=material, entered=entered, learned=learned, inviter=inviter.node_id)


def ca_node_of(reply: peer_pb2.JoinReply, inviter: Inviter) -> str:
    """The node that holds the CA key, as the join's answer names it; a CA's node of peer
    protocol 1.0 does not, and was the inviter then (only it could invite)."""
    return reply.ca_node_id or inviter.node_id


def _refusal(e: grpc.aio.AioRpcError, target: str, timeout: float) -> ExoError:
    return from_peer(
        e,
        f"the inviter at {target} failed the join",
        gone=(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED),
        unreachable=f"the inviter at {target} stopped answering within {timeout:g}s "
        "(EXOD_PEER_TIMEOUT): retry `exoctl cluster join` with the same token, or ask for a new "
        "invite",
    )
