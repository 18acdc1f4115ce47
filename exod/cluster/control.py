"""This node's cluster membership: `exoctl cluster init / invite / join / remove / leave`, the
peer server, and the renewal of this node's certificate.

The TLS store (`$EXOD_HOME/tls`) says whether the node belongs to a cluster. What only the CA's
node may do (issue an invite, admit a joiner, remove a node, sign) is in authority.py; on any
other member the same commands ask the CA's node over mutual TLS, and the member's join port
passes a joiner's request on to it, so that every member can invite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import grpc
import psutil

from exod.cluster import addresses, ca_client, invite, join_client, peer_server, pki, tls_store
from exod.cluster.authority import Authority, check_ttl, leave_instead
from exod.cluster.peer_server import CaDuties, PeerService
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.cluster.rank_host import RankHost
from exod.cluster.replication import Replication
from exod.config import Settings
from exod.errors import ExoError
from exod.journal import Journal
from exod.models.cache import ModelCache
from exod.proto.exo.v1 import control_pb2, events_pb2, peer_pb2, peer_pb2_grpc
from exod.runners.supervisor import Supervisor

log = logging.getLogger(__name__)
T = TypeVar("T")

# The CA outlives the certificates it signs: they renew under it.
CA_LIFETIMES = 10
# How often a member looks whether its certificate is due for renewal (two thirds of its
# lifetime): often enough that a node off for weeks renews soon after it comes back.
RENEW_CHECK_S = 3600
# How long leaving waits for the followers to end (each ends within a backoff step, at most 5 s).
STOP_WAIT_S = 6.0


class CannotListen(Exception):
    """The peer (or join) port cannot be bound; the message says which and what to do."""


def tls_dir(settings: Settings) -> Path:
    return settings.home / "tls"


def machine_addresses() -> list[str]:
    return [a.address for nics in psutil.net_if_addrs().values() for a in nics]


class Cluster:
    def __init__(
        self,
        settings: Settings,
        node_id: str,
        journal: Journal,
        material: tls_store.Material | None,
        supervisor: Supervisor | None = None,
    ) -> None:
        """`material`: what `tls_store.load(tls_dir(settings))` read at start. `supervisor`:
        where this node runs the ranks of split models that members ask it to run."""
        self._settings = settings
        self._id = node_id
        self._journal = journal
        self._dir = tls_dir(settings)
        self._lock = asyncio.Lock()
        self._server: grpc.aio.Server | None = None
        self._material = material
        self._renewer: asyncio.Task[None] | None = None
        self._authority = Authority(settings, node_id, journal, self._members)
        self.replication = Replication(node_id, journal, settings.peer_timeout)
        # What members send this node for the split models it runs a rank of (issue 12).
        self.models = ModelCache(
            settings.home / "cache" / "models", settings.model_cache_bytes, node_id
        )
        self.ranks = (
            RankHost(settings, node_id, supervisor, self.models) if supervisor is not None else None
        )

    def addresses(self) -> list[str]:
        """Where members reach this node's peer port; none outside a cluster."""
        if self._material is None:
            return []
        try:
            return list(addresses.invite_addresses(self._settings.peer_bind, machine_addresses()))
        except ExoError:
            return []

    @property
    def material(self) -> tls_store.Material | None:
        """This node's TLS files, when it belongs to a cluster."""
        return self._material

    def info(self) -> control_pb2.ClusterInfo | None:
        material = self._material
        if material is None:
            return None
        ca = pki.cert_info(material.ca_cert)
        return control_pb2.ClusterInfo(id=ca.name, ca_fingerprint=ca.fingerprint)

    async def start(self) -> None:
        """Listen on the peer port when this node belongs to a cluster (else nothing listens)."""
        await asyncio.to_thread(self.models.clean)
        if self._material is not None:
            self._server = await self._listen(self._material)
            self.replication.start(self._material)
            self._start_renewals()

    async def stop(self) -> None:
        await self._stop_renewals()
        await self.replication.stop()
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None

    def is_removed(self, node_id: str) -> bool:
        """Whether a verified NodeRemoved took that node out: the peer server refuses it."""
        return node_id in self._journal.state.removed

    def warnings(self, now: float) -> list[control_pb2.Warning]:
        """`cert_expiring` when this node's certificate ends within 30 days (renewal failing)."""
        material = self._material
        if material is None or not pki.expires_soon(material.node_cert, now):
            return []
        ends = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(pki.cert_info(material.node_cert).not_after)
        )
        if material.ca_key is not None:
            fix = "this node renews it itself every hour: see exod's log for why it did not"
        else:
            ca = self._journal.state.ca_node or "the CA's node"
            fix = (
                f"it renews from {ca} (checked every hour): start exod there and let this node "
                "reach it; once it has expired, join again with a new invite"
            )
        return [
            control_pb2.Warning(
                code="cert_expiring",
                message=f"this node's cluster certificate expires at {ends}: {fix}",
            )
        ]

    async def _listen(self, material: tls_store.Material) -> grpc.aio.Server:
        s = self._settings
        duties = CaDuties(
            leave=self._leaving,
            renew=self._renewing,
            invite=self._inviting,
            admit=self._admitting,
            remove=self._removing,
        )
        service = PeerService(
            self._id,
            s.node_name,
            self._join_port,
            journal=self._journal,
            members=self._members,
            # Three beats within the timeout: one lost or late does not make a member unreachable.
            heartbeat_s=s.peer_timeout / 3,
            ca_cert=material.ca_cert,
            ca=duties if material.ca_key is not None else None,
            reserved=s.reserved_memory,
            runner_cap=s.max_runner_memory,
            models=self.models,
            ranks=self.ranks,
        )
        ports = [("peer", s.peer_port, "EXOD_PEER_PORT"), ("join", s.join_port, "EXOD_JOIN_PORT")]
        for what, port, setting in ports:
            try:
                peer_server.check_port(s.peer_bind, port)
            except OSError as e:
                raise CannotListen(
                    f"cannot listen on {peer_server.endpoint(s.peer_bind, port)} (the {what} "
                    f"port): {e.strerror or e}; if another program uses it, set {setting} to a "
                    "free port; else set EXOD_PEER_BIND to an address of this machine"
                ) from None
        try:
            return await peer_server.start(
                bind=s.peer_bind,
                peer_port=s.peer_port,
                join_port=s.join_port,
                ca_cert=material.ca_cert,
                node_key=material.node_key,
                node_cert=material.node_cert,
                service=service,
                is_removed=self.is_removed,
            )
        except RuntimeError as e:  # gRPC's bind failure
            raise CannotListen(
                f"cannot listen on {peer_server.endpoint(s.peer_bind, s.peer_port)} (peer port) "
                f"or {s.join_port} (join port): {e}; is another program using it? set "
                "EXOD_PEER_PORT / EXOD_JOIN_PORT to free ports"
            ) from None

    async def _become(
        self,
        material: tls_store.Material,
        entered: events_pb2.ClusterEntered,
        learned: events_pb2.MembersLearned | None = None,
    ) -> None:
        """Listen as a member, then keep the files (node.crt last) and log it."""
        try:
            server = await self._listen(material)
        except CannotListen as e:
            raise ExoError("peer_unreachable", str(e)) from None
        try:
            await asyncio.to_thread(tls_store.save, self._dir, material)
        except tls_store.TlsStoreError as e:
            await server.stop(grace=None)
            reason = "disk_full" if e.disk_full else "permission_denied"
            raise ExoError(reason, str(e)) from None
        self._server, self._material = server, material
        self._journal.append(events_pb2.Event(cluster_entered=entered))
        if learned is not None and learned.members:
            self._journal.append(events_pb2.Event(members_learned=learned))
        self.replication.start(material)
        self._start_renewals()

    def _refuse_member(self, doing: str) -> None:
        info = self.info()
        if info is not None:
            raise ExoError(
                "invalid_argument",
                f"this node already belongs to cluster {info.id} (CA {info.ca_fingerprint[:16]}"
                f"...), so it cannot {doing}: to add a node to it, run `exoctl cluster invite` "
                "here and `exoctl cluster join TOKEN` on that node",
            )

    # --- init -------------------------------------------------------------------------------------

    async def init(self) -> control_pb2.ClusterReply:
        async with self._lock:
            self._journal.check_writable("make a cluster")
            self._refuse_member("make another one")
            s, now = self._settings, time.time()
            cluster_id = "c-" + secrets.token_hex(6)
            lifetime = s.cert_lifetime
            ca_key, ca_cert = pki.new_ca(cluster_id, lifetime * CA_LIFETIMES, now)
            node_key = pki.new_node_key()
            csr = pki.csr_for(node_key, self._id)
            node_cert = pki.sign_node(ca_key, ca_cert, csr, self._id, lifetime_s=lifetime, now=now)
            material = tls_store.Material(
                ca_cert=ca_cert, node_key=node_key, node_cert=node_cert, ca_key=ca_key
            )
            fingerprint = pki.fingerprint(ca_cert)
            entered = events_pb2.ClusterEntered(
                cluster_id=cluster_id,
                ca_fingerprint=fingerprint,
                how="init",
                ca_node_id=self._id,
                ca_cert=ca_cert,
            )
            await self._become(material, entered)
            log.info("made cluster %s", cluster_id)
            return self._reply()

    def _reply(self) -> control_pb2.ClusterReply:
        return control_pb2.ClusterReply(cluster=self.info(), node_id=self._id)

    # --- invite -----------------------------------------------------------------------------------

    async def invite(self, ttl_s: int) -> control_pb2.ClusterInviteReply:
        """A token for the joiner, naming this node's join port: on the CA's node the secret is
        made here, on another member the CA's node makes it (75 naming it when unreachable)."""
        material = self._material
        if material is None:
            raise ExoError(
                "invalid_argument",
                "this node is in no cluster, so it cannot invite: run `exoctl cluster init` "
                "first (or join one with `exoctl cluster join TOKEN`)",
            )
        ttl = check_ttl(ttl_s)
        where = addresses.invite_addresses(self._settings.peer_bind, machine_addresses())
        if material.ca_key is not None:
            async with self._lock:
                secret, expires = self._authority.issue(ttl, inviter="")
        else:
            request = peer_pb2.InviteRequest(protocol_version=PROTOCOL_VERSION, ttl_s=ttl)
            made = await self._ask_ca(
                material,
                "make an invite",
                lambda stub, timeout: stub.Invite(request, timeout=timeout),
            )
            secret, expires = made.secret, int(made.expires)
        token = invite.Invite(
            addresses=tuple(where),
            port=self._settings.join_port,
            ca_fingerprint=pki.fingerprint(material.ca_cert),
            secret=secret,
            expires=expires,
        )
        return control_pb2.ClusterInviteReply(
            token=invite.encode(token), expires=expires, addresses=where
        )

    # --- join (the joiner) ------------------------------------------------------------------------

    async def join(self, token: str) -> control_pb2.ClusterReply:
        async with self._lock:
            self._journal.check_writable("join a cluster")
            self._refuse_member("join another")
            s = self._settings
            try:
                mine = addresses.invite_addresses(s.peer_bind, machine_addresses())
            except ExoError:
                mine = ()  # the others learn it by mDNS; joining needs only the inviter's
            me = peer_pb2.Member(id=self._id, name=s.node_name, addresses=mine, port=s.peer_port)
            joined = await join_client.join_with(token, me, s.peer_timeout)
            await self._become(joined.material, joined.entered, joined.learned)
            log.info("joined cluster %s through %s", joined.entered.cluster_id, joined.inviter)
            return self._reply()

    # --- the join port (any member), and what only the CA's node does for members --------------

    async def _join_port(self, request: peer_pb2.JoinRequest) -> peer_pb2.JoinReply:
        """A joiner's Join: admitted here on the CA's node, else passed on to the CA's node,
        which checks the secret (this member keeps nothing of the invites)."""
        material = self._material
        if material is None:
            raise ExoError(
                "invite_refused", "the inviter left its cluster: ask a member for a new invite"
            )
        if material.ca_key is not None:
            async with self._lock:
                return self._authority.admit(material, request, via="")
        try:
            return await self._ask_ca(
                material,
                "admit the joining node",
                lambda stub, timeout: stub.Admit(request, timeout=timeout),
                # Half the joiner's wait: it hears why, not only that the inviter went quiet.
                timeout=self._settings.peer_timeout / 2,
            )
        except ExoError as e:
            if e.reason != "peer_unreachable":
                raise
            raise ExoError(
                "peer_unreachable",
                f"the inviter {self._id} passes joins on to the CA's node {self._ca_holder()}, "
                "which it cannot reach now: start exod there (or ask a member that reaches it "
                "for an invite), then retry `exoctl cluster join` with the same token",
            ) from None

    async def _inviting(self, caller: str, ttl_s: int) -> tuple[bytes, int]:
        async with self._lock:
            self._held_ca()
            return self._authority.issue(ttl_s, inviter=caller)

    async def _admitting(self, caller: str, request: peer_pb2.JoinRequest) -> peer_pb2.JoinReply:
        async with self._lock:
            return self._authority.admit(self._held_ca(), request, via=caller)

    async def _removing(self, caller: str, node_id: str) -> None:
        async with self._lock:
            material = self._held_ca()
            member = self._authority.removable(node_id, caller)
            self._authority.remove(material, member.id, member.cert_fingerprint, "remove")

    async def _ask_ca(
        self,
        material: tls_store.Material,
        doing: str,
        what: Callable[[peer_pb2_grpc.PeerAsyncStub, float], Awaitable[T]],
        timeout: float | None = None,  # noqa: ASYNC109  # per address; EXOD_PEER_TIMEOUT unless given
    ) -> T:
        """`what` on the CA's node over mutual TLS; ExoError naming that node when it cannot."""
        state = self._journal.state
        return await ca_client.call(
            material,
            ca_node=state.members.get(state.ca_node),
            ca_node_id=state.ca_node,
            timeout=timeout or self._settings.peer_timeout,
            doing=doing,
            what=what,
        )

    def _members(self) -> list[peer_pb2.Member]:
        s = self._settings
        try:
            mine = addresses.invite_addresses(s.peer_bind, machine_addresses())
        except ExoError:
            mine = ()
        me = peer_pb2.Member(id=self._id, name=s.node_name, addresses=mine, port=s.peer_port)
        others = [
            peer_pb2.Member(id=m.id, name=m.name, addresses=m.addresses, port=m.port)
            for m in self._journal.state.members.values()
        ]
        return [me, *others]

    # --- remove, leave ----------------------------------------------------------------------------

    def _ca_holder(self) -> str:
        """Who holds the CA key, for messages that send the user there."""
        return self._journal.state.ca_node or "the node that ran `exoctl cluster init`"

    def _held_ca(self) -> tls_store.Material:
        """This node's material with the CA key, for what only the CA's node does for a peer."""
        material = self._material
        if material is None or material.ca_key is None:
            raise ExoError(
                "peer_unreachable", "this node no longer holds the CA key: ask the one that does"
            )
        return material

    def _member_material(self, doing: str) -> tls_store.Material:
        if self._material is None:
            raise ExoError(
                "invalid_argument",
                f"this node is in no cluster, so it cannot {doing}: `exoctl status` shows "
                "`cluster` null",
            )
        return self._material

    async def remove(self, node_id: str) -> control_pb2.ClusterRemoveReply:
        """Take a member out: signed here on the CA's node, else asked of the CA's node."""
        material = self._member_material("remove a node")
        if material.ca_key is not None:
            async with self._lock:
                member = self._authority.removable(node_id, self._id)
                self._authority.remove(material, member.id, member.cert_fingerprint, "remove")
        else:
            if node_id == self._id:  # known here: no need to ask
                raise ExoError("invalid_argument", leave_instead(node_id))
            request = peer_pb2.RemoveRequest(protocol_version=PROTOCOL_VERSION, node_id=node_id)
            await self._ask_ca(
                material,
                f"remove {node_id[:70]}",
                lambda stub, timeout: stub.Remove(request, timeout=timeout),
            )
        return control_pb2.ClusterRemoveReply(cluster=self.info(), node_id=node_id)

    async def _leaving(self, caller: str) -> None:
        """Leave, called by the peer server on the CA's node for a member that asks to go."""
        async with self._lock:
            material = self._held_ca()
            member = self._journal.state.members.get(caller)
            fingerprint = member.cert_fingerprint if member is not None else ""
            self._authority.remove(material, caller, fingerprint, "leave")

    async def leave(self) -> control_pb2.ClusterReply:
        async with self._lock:
            # The removal would name this id, which the original node still uses.
            self._journal.check_writable("leave its cluster")
            material = self._member_material("leave one")
            if material.ca_key is not None:
                raise ExoError(
                    "invalid_argument",
                    "the CA's node cannot leave its own cluster: remove the other members with "
                    "`exoctl cluster remove NODE`, or move ca.key to another member first "
                    "(docs/cluster.md, moving the CA key) and leave then",
                )
            request = peer_pb2.LeaveRequest(protocol_version=PROTOCOL_VERSION)
            await self._ask_ca(
                material,
                "leave the cluster",
                lambda stub, timeout: stub.Leave(request, timeout=timeout),
            )
            left = self._reply()
            await self._forget()
            log.info("left cluster %s", left.cluster.id)
            return left

    async def _forget(self) -> None:
        """Out of the cluster: files first (node.crt first: a crash leaves no half member), then
        the log (the members forgotten), then the peer port and the following; runners are
        untouched."""
        info = self.info()
        try:
            await asyncio.to_thread(tls_store.clear, self._dir, including_ca_key=True)
        except tls_store.TlsStoreError as e:
            raise ExoError("permission_denied", str(e)) from None
        self._material = None
        left = events_pb2.ClusterLeft(cluster_id=info.id if info is not None else "")
        # Logged before the followers are stopped: with no members left, a follower that
        # missed its cancellation (asyncio.wait_for on 3.11 can swallow one) ends by itself.
        self._journal.append(events_pb2.Event(cluster_left=left))
        await self._stop_renewals()
        stopping = asyncio.ensure_future(self.replication.stop())
        done, _ = await asyncio.wait({stopping}, timeout=STOP_WAIT_S)
        if not done:
            log.warning("the followers did not stop within %gs; leaving without them", STOP_WAIT_S)
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None

    # --- renewal ----------------------------------------------------------------------------------

    def _start_renewals(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renewals())

    async def _stop_renewals(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def _renewals(self) -> None:
        while True:
            try:
                await self.renew_if_due(time.time())
            except (ExoError, CannotListen) as e:
                log.warning("could not renew this node's certificate (retried in an hour): %s", e)
            except Exception:
                log.exception("renewing this node's certificate failed; retried in an hour")
            await asyncio.sleep(RENEW_CHECK_S)

    async def renew_if_due(self, now: float) -> bool:
        """Renew this node's certificate once two thirds of its lifetime passed: signed here on
        the CA's node, else by the CA's node over mTLS (the current certificate vouches for the
        request). Same key, same id; the peer port then listens with the new one."""
        async with self._lock:
            material = self._material
            if material is None or not pki.needs_renewal(material.node_cert, now):
                return False
            csr = pki.csr_for(material.node_key, self._id)
            if material.ca_key is not None:
                cert = self._authority.sign(material, self._id, csr, now)
            else:
                request = peer_pb2.RenewRequest(protocol_version=PROTOCOL_VERSION, csr=csr)
                reply = await self._ask_ca(
                    material,
                    "renew its certificate",
                    lambda stub, timeout: stub.Renew(request, timeout=timeout),
                )
                cert = reply.node_cert
                if pki.verify_node_cert(
                    material.ca_cert, cert, time.time()
                ) != self._id or not pki.key_matches(material.node_key, cert):
                    raise ExoError(
                        "permission_denied", "the CA's node sent a certificate for another node"
                    )
            renewed = dataclasses.replace(material, node_cert=cert)
            try:
                await asyncio.to_thread(tls_store.save, self._dir, renewed)
            except tls_store.TlsStoreError as e:
                raise ExoError(
                    "disk_full" if e.disk_full else "permission_denied", str(e)
                ) from None
            # gRPC's server keeps the certificate it started with: listen again with the new one.
            if self._server is not None:
                await self._server.stop(grace=1.0)
                self._server = None
            self._server = await self._listen(renewed)
            self._material = renewed
            self.replication.start(renewed)
            ends = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pki.cert_info(cert).not_after))
            log.info("renewed this node's certificate: valid until %s", ends)
            return True

    async def _renewing(self, caller: str, csr: bytes) -> bytes:
        """Renew, called by the peer server on the CA's node: a new certificate for the caller's
        own id (the CSR must name it), lasting EXOD_CERT_LIFETIME from now."""
        async with self._lock:
            cert = self._authority.sign(self._held_ca(), caller, csr, time.time())
            log.info("renewed the certificate of %s", caller)
            return cert
