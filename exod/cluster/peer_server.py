"""The peer service: gRPC over TCP under the cluster's TLS, two ports on one server.

    peer port  mutual TLS: a caller without a certificate of this cluster's CA fails the handshake,
               and every call is checked again here (`verify_node_cert`: issuer, validity, id).
    join port  TLS without a client certificate, on every member: the one call it serves is
               Join, which does nothing but have the invite's secret checked (here on the CA's
               node, else by the CA's node, to which the member passes the request on).

Two ports because gRPC's Python server either demands a client certificate or never asks for
one (`require_client_auth=False` does not even request it), so a single port could not both
admit a joiner without a certificate and read a member's.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc
import psutil

from exod.cluster import pki, tls_store, weights_receive
from exod.cluster.protocol import PROTOCOL_VERSION, check_version
from exod.cluster.rank_host import RankHost
from exod.cluster.replicated import REPLICATED_KINDS
from exod.errors import ExoError, abort
from exod.journal import Journal
from exod.models.cache import ModelCache
from exod.proto.exo.v1 import peer_pb2, peer_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name
JOIN = f"/{SERVICE}/Join"
# Served even to a removed node: leaving again changes nothing, and it must be able to clean up.
LEAVE = f"/{SERVICE}/Leave"
# Keepalive: a peer that went away (a Mac asleep, a cable pulled) is noticed without traffic.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]

JoinHandler = Callable[[peer_pb2.JoinRequest], Awaitable[peer_pb2.JoinReply]]
MembersOf = Callable[[], list[peer_pb2.Member]]
IsRemoved = Callable[[str], bool]
Ctx = grpc.aio.ServicerContext[object, object]
# Records read from the log, and sent in one message, per batch while a follower catches up
# (events are small: a few hundred bytes at most, so a batch stays far below gRPC's 4 MiB).
FOLLOW_BATCH = 500


@dataclass(frozen=True)
class CaDuties:
    """What only the node holding the CA key serves its members; each handler gets the caller's
    node id (from its certificate) first."""

    leave: Callable[[str], Awaitable[None]]
    renew: Callable[[str, bytes], Awaitable[bytes]]  # the CSR -> the new certificate
    invite: Callable[[str, int], Awaitable[tuple[bytes, int]]]  # ttl_s -> secret, expires
    admit: Callable[[str, peer_pb2.JoinRequest], Awaitable[peer_pb2.JoinReply]]
    remove: Callable[[str, str], Awaitable[None]]  # the node to remove


def _memory() -> tuple[int, int]:
    memory = psutil.virtual_memory()
    return int(memory.available), int(memory.total)


class PeerService(peer_pb2_grpc.PeerServicer):
    def __init__(
        self,
        node_id: str,
        name: str,
        join: JoinHandler,
        *,
        journal: Journal,
        members: MembersOf,
        heartbeat_s: float,
        ca_cert: bytes = b"",
        ca: CaDuties | None = None,
        reserved: int = 0,
        runner_cap: int = 0,
        models: ModelCache | None = None,
        ranks: RankHost | None = None,
    ) -> None:
        """`ca`: only on the node holding the CA key (elsewhere those calls are refused);
        `ca_cert` tells their caller's id from its certificate. `reserved` and `runner_cap`
        (EXOD_RESERVED_MEMORY, EXOD_MAX_RUNNER_MEMORY) go out with the free memory, so that a
        member places a model here only where a runner may take the room. `models`: where
        HasModel and PushModel keep what members send (none: both are refused). `ranks`: what
        runs a rank of a split model here (none: Rank is refused)."""
        self._ranks = ranks
        self._id = node_id
        self._reserved = reserved
        self._runner_cap = runner_cap
        self._models = models
        self._ca_cert = ca_cert
        self._ca = ca
        self._name = name
        self._join = join
        self._journal = journal
        self._members = members
        # A follower counts this node unreachable after EXOD_PEER_TIMEOUT of silence: a
        # heartbeat well within it keeps an idle stream visibly alive.
        self._heartbeat_s = heartbeat_s

    async def Join(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.JoinRequest,
        context: grpc.aio.ServicerContext[peer_pb2.JoinRequest, peer_pb2.JoinReply],
    ) -> peer_pb2.JoinReply:
        try:
            check_version(request.protocol_version, "the joining node")
            return await self._join(request)
        except ExoError as e:
            await abort(context, e)

    def _duties(self, context: object, doing: str) -> tuple[CaDuties, str]:
        """The CA's duties and the caller's id, or ExoError (not the CA's node, no certificate)."""
        caller = caller_id(cast("Ctx", context), self._ca_cert, time.time())
        if self._ca is None:
            raise self._not_ca(doing)
        return self._ca, caller

    async def Leave(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.LeaveRequest,
        context: grpc.aio.ServicerContext[peer_pb2.LeaveRequest, peer_pb2.LeaveReply],
    ) -> peer_pb2.LeaveReply:
        try:
            check_version(request.protocol_version, "the leaving node")
            ca, caller = self._duties(context, "leave")
            await ca.leave(caller)
        except ExoError as e:
            await abort(context, e)
        return peer_pb2.LeaveReply(protocol_version=PROTOCOL_VERSION)

    async def Renew(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[peer_pb2.RenewRequest, peer_pb2.RenewReply],
    ) -> peer_pb2.RenewReply:
        try:
            check_version(request.protocol_version, "the renewing node")
            ca, caller = self._duties(context, "renew a certificate")
            cert = await ca.renew(caller, request.csr)
        except ExoError as e:
            await abort(context, e)
        return peer_pb2.RenewReply(protocol_version=PROTOCOL_VERSION, node_cert=cert)

    async def Invite(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.InviteRequest,
        context: grpc.aio.ServicerContext[peer_pb2.InviteRequest, peer_pb2.InviteReply],
    ) -> peer_pb2.InviteReply:
        try:
            check_version(request.protocol_version, "the inviting node")
            ca, caller = self._duties(context, "make an invite")
            secret, expires = await ca.invite(caller, int(request.ttl_s))
        except ExoError as e:
            await abort(context, e)
        return peer_pb2.InviteReply(
            protocol_version=PROTOCOL_VERSION, secret=secret, expires=expires
        )

    async def Admit(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.JoinRequest,
        context: grpc.aio.ServicerContext[peer_pb2.JoinRequest, peer_pb2.JoinReply],
    ) -> peer_pb2.JoinReply:
        try:
            check_version(request.protocol_version, "the joining node")
            ca, caller = self._duties(context, "admit a joining node")
            return await ca.admit(caller, request)
        except ExoError as e:
            await abort(context, e)

    async def Remove(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.RemoveRequest,
        context: grpc.aio.ServicerContext[peer_pb2.RemoveRequest, peer_pb2.RemoveReply],
    ) -> peer_pb2.RemoveReply:
        try:
            check_version(request.protocol_version, "the removing node")
            ca, caller = self._duties(context, "remove a node")
            await ca.remove(caller, request.node_id)
        except ExoError as e:
            await abort(context, e)
        return peer_pb2.RemoveReply(protocol_version=PROTOCOL_VERSION)

    def _cache(self) -> ModelCache:
        if self._models is None:
            raise ExoError("internal", f"{self._id} keeps no model cache: it cannot take models")
        return self._models

    async def HasModel(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.HasModelRequest,
        context: grpc.aio.ServicerContext[peer_pb2.HasModelRequest, peer_pb2.HasModelReply],
    ) -> peer_pb2.HasModelReply:
        try:
            return await asyncio.to_thread(weights_receive.has, self._cache(), request)
        except ExoError as e:
            await abort(context, e)

    async def PushModel(  # gRPC method names are CamelCase
        self,
        request_iterator: AsyncIterator[peer_pb2.ModelChunk],
        context: grpc.aio.ServicerContext[peer_pb2.ModelChunk, peer_pb2.PushModelReply],
    ) -> AsyncIterator[peer_pb2.PushModelReply]:
        try:
            sender = caller_id(cast("Ctx", context), self._ca_cert, time.time())
            async for reply in weights_receive.receive(self._cache(), request_iterator, sender):
                yield reply
        except ExoError as e:
            await abort(context, e)

    async def Rank(  # gRPC method names are CamelCase
        self,
        request_iterator: AsyncIterator[peer_pb2.RankUp],
        context: grpc.aio.ServicerContext[peer_pb2.RankUp, peer_pb2.RankDown],
    ) -> AsyncIterator[peer_pb2.RankDown]:
        try:
            ranks, caller = self._rank_host(cast("Ctx", context))
            async for down in ranks.serve(request_iterator, caller):
                yield down
        except ExoError as e:
            await abort(context, e)

    async def Generate(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[peer_pb2.GenerateRequest, peer_pb2.GenerateReply],
    ) -> AsyncIterator[peer_pb2.GenerateReply]:
        try:
            ranks, caller = self._rank_host(cast("Ctx", context))
            async for reply in ranks.generate(request, caller):
                yield reply
        except ExoError as e:
            await abort(context, e)

    def _rank_host(self, context: Ctx) -> tuple[RankHost, str]:
        """What runs ranks here, and the calling member's id."""
        caller = caller_id(context, self._ca_cert, time.time())
        if self._ranks is None:
            raise ExoError("internal", f"{self._id} cannot run a rank of a split model")
        return self._ranks, caller

    def _not_ca(self, doing: str) -> ExoError:
        return ExoError(
            "peer_unreachable",
            f"{self._id} does not hold the cluster's CA key, so it cannot {doing}: ask the node "
            "that does (the one that ran `exoctl cluster init`)",
        )

    async def Hello(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.PeerHelloRequest,
        context: grpc.aio.ServicerContext[peer_pb2.PeerHelloRequest, peer_pb2.PeerHelloReply],
    ) -> peer_pb2.PeerHelloReply:
        try:
            check_version(request.protocol_version, f"peer {request.node_id}")
        except ExoError as e:
            await abort(context, e)
        free, total = _memory()
        store = self._journal.store
        held, digest = 0, b""
        if request.node_id and request.node_id != self._id:
            held = await asyncio.to_thread(store.held, request.node_id)
            payload = await asyncio.to_thread(store.payload_at, request.node_id, held)
            digest = hashlib.sha256(payload).digest() if payload is not None else b""
        own = await asyncio.to_thread(store.held, self._id)
        return peer_pb2.PeerHelloReply(
            protocol_version=PROTOCOL_VERSION,
            node_id=self._id,
            name=self._name,
            memory_free_bytes=free,
            memory_total_bytes=total,
            memory_reserved_bytes=self._reserved,
            runner_memory_cap_bytes=self._runner_cap,
            members=self._members(),
            caller_origin_seq=held,
            own_origin_seq=own,
            caller_last_digest=digest,
        )

    async def Follow(  # gRPC method names are CamelCase
        self,
        request: peer_pb2.FollowRequest,
        context: grpc.aio.ServicerContext[peer_pb2.FollowRequest, peer_pb2.FollowReply],
    ) -> AsyncIterator[peer_pb2.FollowReply]:
        try:
            check_version(request.protocol_version, f"a follower of {request.origin}")
            if request.after_origin_seq < 0:
                raise ExoError("invalid_argument", "after_origin_seq must not be negative")
        except ExoError as e:
            await abort(context, e)
        store, origin = self._journal.store, request.origin
        after = request.after_origin_seq
        # What the follower should hold: the last replicated event at or before `after`.
        prev = await asyncio.to_thread(store.last_of_kinds, origin, after, REPLICATED_KINDS)
        sent = time.monotonic()
        while True:
            # Noted before reading, so that an append between the read and the wait wakes it.
            seen = self._journal.state.last_seq
            batch = await asyncio.to_thread(
                store.read_origin, origin, after, REPLICATED_KINDS, FOLLOW_BATCH
            )
            if batch:
                events = peer_pb2.ReplicatedEvents()
                for r in batch:
                    events.events.add(
                        origin=r.origin,
                        origin_seq=r.origin_seq,
                        prev_origin_seq=prev,
                        ts=r.ts,
                        kind=r.kind,
                        payload=r.payload,
                    )
                    prev = after = r.origin_seq
                yield peer_pb2.FollowReply(events=events)
                sent = time.monotonic()
                continue  # read again: more may have come while these were sent
            # A heartbeat when nothing was sent for a while, even while the log grows with
            # local events only (a busy node's runs), so the follower never mistakes it for gone.
            left = self._heartbeat_s - (time.monotonic() - sent)
            if left > 0:
                try:
                    await asyncio.wait_for(self._journal.wait_beyond(seen), left)
                    continue
                except TimeoutError:
                    pass
            free, total = _memory()
            yield peer_pb2.FollowReply(
                heartbeat=peer_pb2.PeerHeartbeat(
                    name=self._name,
                    memory_free_bytes=free,
                    memory_total_bytes=total,
                    memory_reserved_bytes=self._reserved,
                    runner_memory_cap_bytes=self._runner_cap,
                )
            )
            sent = time.monotonic()


def caller_id(context: Ctx, ca_cert: bytes, now: float) -> str:
    """The node id in the caller's certificate, once this cluster's CA vouches for it;
    ExoError otherwise (no certificate: a caller of the join port)."""
    # A list of PEMs per key at run time (grpc-stubs says bytes): the caller's certificate.
    pems = cast("list[bytes]", context.auth_context().get("x509_pem_cert", []))
    if not pems:
        raise ExoError(
            "permission_denied",
            "this call needs a certificate of this cluster: only Join is served without one",
        )
    return pki.verify_node_cert(ca_cert, pems[0], now)


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[object, object]
else:  # generic in grpc-stubs only
    _Interceptor = grpc.aio.ServerInterceptor


class CertificateCheck(_Interceptor):
    """Every method but Join runs only for a caller whose certificate this cluster's CA issued
    and whose node no verified NodeRemoved took out of the cluster (but Leave, which a removed
    node may call again)."""

    def __init__(self, ca_cert: bytes, is_removed: IsRemoved = lambda _: False) -> None:
        self._ca_cert = ca_cert
        self._is_removed = is_removed

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[object, object]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[object, object]:
        handler = await continuation(handler_call_details)
        if handler_call_details.method == JOIN or handler is None:
            return handler
        ca_cert, is_removed = self._ca_cert, self._is_removed
        leaving = handler_call_details.method == LEAVE

        async def check(context: Ctx) -> None:
            try:
                caller = caller_id(context, ca_cert, time.time())
                if not leaving and is_removed(caller):
                    raise ExoError(
                        "permission_denied",
                        f"node {caller} was removed from this cluster (exoctl cluster remove or "
                        "leave), so every member refuses its calls: to bring that machine back, "
                        "move its EXOD_HOME aside and join again as a new node",
                    )
            except ExoError as e:
                e.reason = "permission_denied"
                await abort(context, e)

        # Each call shape gets the same check before its behaviour runs, so a refused caller
        # has nothing of its request (or its stream) read.
        answers = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        )
        for behaviour, make in answers:
            if behaviour is not None:
                return make(
                    _answer_after(check, cast("Answer", behaviour)),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        streams = (
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
        )
        for behaviour, make_stream in streams:
            if behaviour is not None:
                return make_stream(
                    _stream_after(check, cast("Replies", behaviour)),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        # A call of another shape must get its own check here before it is served.
        return cast("grpc.RpcMethodHandler[object, object]", None)


# A behaviour's first argument is the request, or the requests' iterator: the check is the same.
Answer = Callable[[object, Ctx], Awaitable[object]]
Replies = Callable[[object, Ctx], AsyncIterator[object]]
Check = Callable[[Ctx], Awaitable[None]]


def _answer_after(check: Check, behaviour: Answer) -> Answer:
    async def checked(request: object, context: Ctx) -> object:
        await check(context)
        return await behaviour(request, context)

    return checked


def _stream_after(check: Check, behaviour: Replies) -> Replies:
    async def checked(request: object, context: Ctx) -> AsyncIterator[object]:
        await check(context)
        async for reply in behaviour(request, context):
            yield reply

    return checked


def check_port(bind: str, port: int) -> None:
    """OSError when bind:port cannot be listened on (in use, not this machine's address): found
    here because gRPC would say it in a line of its own on stderr, and less clearly."""
    family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        probe.bind((bind, port))


def peer_channel(material: tls_store.Material, node_id: str, target: str) -> grpc.aio.Channel:
    """A channel to another member's peer port at `target` (host:port) under mutual TLS: this
    node's certificate, and the member's checked to be of this cluster and to name `node_id`, so
    that no other member can stand in for it."""
    credentials = grpc.ssl_channel_credentials(
        material.ca_cert, material.node_key, material.node_cert
    )
    options = [("grpc.ssl_target_name_override", node_id), *KEEPALIVE]
    return grpc.aio.secure_channel(target, credentials, options=options)


def endpoint(bind: str, port: int) -> str:
    address = ipaddress.ip_address(bind)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


async def start(
    *,
    bind: str,
    peer_port: int,
    join_port: int,
    ca_cert: bytes,
    node_key: bytes,
    node_cert: bytes,
    service: PeerService,
    is_removed: IsRemoved = lambda _: False,
) -> grpc.aio.Server:
    """The peer server, listening on both ports. RuntimeError (gRPC's) when a port cannot be
    bound."""
    # The chain carries the CA certificate too: a joiner reads it from the handshake and checks
    # it against the fingerprint in its invite before it sends the secret.
    chain = node_cert + ca_cert
    server = grpc.aio.server(
        interceptors=[CertificateCheck(ca_cert, is_removed)], options=KEEPALIVE
    )
    peer_pb2_grpc.add_PeerServicer_to_server(service, server)
    mutual = grpc.ssl_server_credentials(
        [(node_key, chain)], root_certificates=ca_cert, require_client_auth=True
    )
    server.add_secure_port(endpoint(bind, peer_port), mutual)
    server.add_secure_port(
        endpoint(bind, join_port), grpc.ssl_server_credentials([(node_key, chain)])
    )
    await server.start()
    log.info("peer port %s, join port %s", endpoint(bind, peer_port), join_port)
    return server
