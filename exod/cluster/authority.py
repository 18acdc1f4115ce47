"""What the node holding the CA key does for the cluster: issue invites, admit joiners, take
nodes out, sign certificates. The same code serves this node's own `exoctl cluster` commands and
the members' requests relayed over mutual TLS (the peer server's Invite, Admit, Remove, Leave and
Renew), so a command behaves alike on every member.

The log records what must outlive a restart: the invites issued (by the secret's digest only),
which were used (NodeJoined), and whom it removed (NodeRemoved, CA-signed: see revocation.py).
Events rather than a table of their own: durable with the log's own fsync, replayed and
snapshotted like everything else, and shown by `exoctl events`. The caller holds the cluster's
lock, so that two requests never spend one invite or sign one removal twice.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from exod.cluster import addresses, invite, joining, pki, revocation, tls_store
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.config import Settings
from exod.errors import ExoError
from exod.eventlog.fold import MemberView
from exod.journal import Journal
from exod.proto.exo.v1 import events_pb2, peer_pb2

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 15 * 60
MAX_TTL_S = 7 * 86400


def check_ttl(ttl_s: int) -> int:
    """The invite's lifetime in seconds (0: the default); ExoError when out of range."""
    ttl = ttl_s or DEFAULT_TTL_S
    if not 0 < ttl <= MAX_TTL_S:
        raise ExoError(
            "invalid_argument", f"an invite lasts 1 s to {MAX_TTL_S // 86400} days, not {ttl} s"
        )
    return ttl


def leave_instead(node_id: str) -> str:
    return f"{node_id} is the node asking: to take it out, run `exoctl cluster leave` there"


@dataclass(frozen=True)
class Authority:
    settings: Settings
    node_id: str
    journal: Journal
    # The members as a joiner learns them, this node first (its addresses as they are now).
    members: Callable[[], list[peer_pb2.Member]]

    def issue(self, ttl_s: int, inviter: str) -> tuple[bytes, int]:
        """A fresh one-time secret and its expiry; only its digest is logged. `inviter`: the
        member that asked (empty: this node)."""
        self.journal.check_writable("issue invites")
        ttl = check_ttl(ttl_s)
        secret = secrets.token_bytes(invite.SECRET_BYTES)
        expires = int(time.time()) + ttl
        issued = events_pb2.InviteIssued(
            secret_digest=invite.secret_digest(secret), expires=expires, inviter=inviter
        )
        self.journal.append(events_pb2.Event(invite_issued=issued))
        return secret, expires

    def admit(
        self, material: tls_store.Material, request: peer_pb2.JoinRequest, via: str
    ) -> peer_pb2.JoinReply:
        """Check the joiner's secret and sign its certificate; `via`: the member whose join port
        it reached (empty: this node's)."""
        assert material.ca_key is not None  # the caller holds the CA key
        self.journal.check_writable("admit nodes")
        now = time.time()
        state = self.journal.state
        used = joining.admit(state.invites, request.secret, now)
        if request.node_id in state.removed:
            raise ExoError(
                "permission_denied",
                f"node {request.node_id} was removed from this cluster, and a removal is for "
                "good: on that node stop exod, move its EXOD_HOME aside (a new id is made at "
                "start) and join with a new invite",
            )
        if request.node_id == self.node_id:
            raise ExoError(
                "invalid_argument",
                f"the joining node has the id {self.node_id} of the CA's node: its home was "
                "copied from there; move its EXOD_HOME aside (it makes a new id at start), then "
                "join",
            )
        node_cert = self.sign(material, request.node_id, request.csr, now)
        joined = events_pb2.NodeJoined(
            node_id=request.node_id,
            name=request.name[:63],
            cert_fingerprint=pki.fingerprint(node_cert),
            secret_digest=used.digest,
            addresses=request.addresses[: addresses.MAX_ADDRESSES],
            port=request.port,
            via=via,
        )
        # Logged before the answer: the invite is spent even if the answer is lost.
        self.journal.append(events_pb2.Event(node_joined=joined))
        log.info(
            "node %s (%s) joined%s",
            request.node_id,
            request.name[:63],
            f" through {via}" * bool(via),
        )
        return peer_pb2.JoinReply(
            protocol_version=PROTOCOL_VERSION,
            node_cert=node_cert,
            ca_cert=material.ca_cert,
            cluster_id=pki.cert_info(material.ca_cert).name,
            members=self.members(),
            ca_node_id=self.node_id,
        )

    def removable(self, node_id: str, caller: str) -> MemberView:
        """The member `caller` (a node id; this node's for its own command) may remove."""
        if node_id == self.node_id:
            raise ExoError(
                "invalid_argument",
                f"{node_id} holds the cluster's CA key, and the CA's node cannot remove itself: "
                "move ca.key to another member first (docs/cluster.md, moving the CA key) and "
                "remove it from there",
            )
        if node_id == caller:
            raise ExoError("invalid_argument", leave_instead(node_id))
        member = self.journal.state.members.get(node_id)
        if member is None:
            raise ExoError(
                "node_not_found",
                f"{node_id[:70]!r} is not a member of this cluster: `exoctl status` lists the "
                "members (NODES)",
            )
        return member

    def remove(
        self, material: tls_store.Material, node_id: str, fingerprint: str, how: str
    ) -> None:
        """The CA-signed entry, once: removing a node removed already changes nothing."""
        if node_id in self.journal.state.removed or material.ca_key is None:
            return
        self.journal.check_writable("remove nodes")
        entry = revocation.sign(material.ca_key, node_id, fingerprint, int(time.time()), how)
        self.journal.append(events_pb2.Event(node_removed=entry))
        log.info("node %s is out of the cluster (%s)", node_id, how)

    def sign(self, material: tls_store.Material, node_id: str, csr: bytes, now: float) -> bytes:
        """A certificate for `node_id`'s key behind `csr`, lasting EXOD_CERT_LIFETIME."""
        assert material.ca_key is not None  # the callers checked
        return pki.sign_node(
            material.ca_key,
            material.ca_cert,
            csr,
            node_id,
            lifetime_s=self.settings.cert_lifetime,
            now=now,
        )
