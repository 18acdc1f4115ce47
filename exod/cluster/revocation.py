"""Removal entries: a member taken out of the cluster, signed by the cluster's CA (pure).

NodeRemoved is the one kind of entry whose signer matters more than its origin: a member obeys
it only when the CA's signature over its canonical encoding checks out with the CA certificate
that member holds. A member therefore cannot remove another by writing one itself, and an entry
signed by another cluster's CA (or altered on the way) is ignored.

The canonical encoding is a version tag and the signed fields, one a line: ids are DNS labels and
the fingerprint is hex, so no field can hold a line break, and one that does is refused rather
than encoded ambiguously.
"""

from __future__ import annotations

from exod.cluster import pki
from exod.errors import ExoError
from exod.proto.exo.v1 import events_pb2

_TAG = "exod node-removed v1"
HOWS = frozenset({"remove", "leave"})


def canonical(node_id: str, cert_fingerprint: str, ts: int, how: str) -> bytes:
    """The bytes the CA signs for a removal; ValueError when a field could blur the encoding."""
    for value in (node_id, cert_fingerprint, how):
        if "\n" in value or "\r" in value:
            raise ValueError(f"a removal field holds a line break: {value[:40]!r}")
    if not node_id or how not in HOWS:
        raise ValueError(f"a removal needs a node id and how ({sorted(HOWS)}), not {how!r}")
    return "\n".join((_TAG, node_id, cert_fingerprint, str(ts), how)).encode()


def sign(
    ca_key: bytes, node_id: str, cert_fingerprint: str, ts: int, how: str
) -> events_pb2.NodeRemoved:
    data = canonical(node_id, cert_fingerprint, ts, how)
    return events_pb2.NodeRemoved(
        node_id=node_id,
        cert_fingerprint=cert_fingerprint,
        ts=ts,
        how=how,
        signature=pki.ca_sign(ca_key, data),
    )


def verified(ca_cert: bytes, removed: events_pb2.NodeRemoved) -> bool:
    """Whether this cluster's CA (`ca_cert`, PEM) signed exactly this removal."""
    if not ca_cert:
        return False
    try:
        data = canonical(removed.node_id, removed.cert_fingerprint, removed.ts, removed.how)
        return pki.ca_verify(ca_cert, data, removed.signature)
    except (ValueError, ExoError):  # a garbled entry or CA certificate: not obeyed
        return False
