"""A member's calls to the node holding the CA key, over mutual TLS: Invite, Admit (a join
that reached this member's join port), Remove, Leave and Renew.

The CA's node is found in the members this node knows (its addresses and peer port, from the
join's answer or the CA's NodeJoined); its certificate must name its id. An address that does not
answer within EXOD_PEER_TIMEOUT gives way to the next; when none answers, the call fails with
peer_unreachable naming the node, and nothing changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from exod.cluster import tls_store
from exod.cluster.peer_server import endpoint, peer_channel
from exod.errors import ExoError, from_peer
from exod.eventlog.fold import MemberView
from exod.proto.exo.v1 import peer_pb2_grpc

T = TypeVar("T")
# PeerAsyncStub exists in the generated stubs only: named as a string.
Call = Callable[["peer_pb2_grpc.PeerAsyncStub", float], Awaitable[T]]
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def call(
    material: tls_store.Material,
    *,
    ca_node: MemberView | None,
    ca_node_id: str,
    timeout: float,  # noqa: ASYNC109  # per address: each gets EXOD_PEER_TIMEOUT
    doing: str,
    what: Call[T],
) -> T:
    """`what(stub, timeout)` on the CA's node; ExoError saying why not (`doing`, in words)."""
    who = ca_node_id or "the node that ran `exoctl cluster init`"
    if ca_node is None or not ca_node.addresses or ca_node.port <= 0:
        raise ExoError(
            "peer_unreachable",
            f"this node knows no address of the CA's node {who}, so it cannot {doing}: start "
            "exod there and let it reach this node, then retry",
        )
    targets = [endpoint(a, ca_node.port) for a in ca_node.addresses]
    for target in targets:
        async with peer_channel(material, ca_node.id, target) as channel:
            try:
                return await what(peer_pb2_grpc.PeerStub(channel), timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() in _GONE:
                    continue
                raise refusal(e, who, doing) from None
    raise ExoError(
        "peer_unreachable",
        f"the CA's node {who} did not answer at {', '.join(targets)} within {timeout:g}s "
        f"(EXOD_PEER_TIMEOUT), so this node could not {doing} and nothing changed: start exod "
        "there (or check this machine can reach it), then retry",
    )


def refusal(e: grpc.aio.AioRpcError, who: str, doing: str) -> ExoError:
    return from_peer(
        e,
        f"the CA's node {who} failed the call",
        # A CA's node of an earlier release (peer protocol 1.0): it serves Leave and Renew only.
        unimplemented=f"the CA's node {who} runs an earlier exod that cannot {doing} for another "
        "member: upgrade exod there, or run the command on that node",
    )
