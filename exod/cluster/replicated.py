"""What replication copies and how a follower checks it (pure: no I/O, no clock).

Which kinds replicate: the facts another member needs to see the whole cluster, and nothing
that grows with traffic or holds local secrets or paths.

    replicated   NodeStarted, NodeStopped (a member's restarts), RunnerSpawned, RunnerReady,
                 RunnerFailed, RunnerStopped (its runners: `exoctl status` counts them per node),
                 ClusterEntered, NodeJoined, NodeRemoved (membership: a node that joined
                 through the CA's node becomes known to every member, and one it removed is
                 refused by every member, even while the CA's node is off),
                 InstancePlaced, InstanceEnded (the split models a member coordinates)
    local only   RunAccepted, RunFinished (one per request: the cluster's logs would grow with
                 everyone's traffic), ModelAdded, ModelRemoved (file paths of this machine; a
                 peer's must never enter this node's registry), InviteIssued (the digests of
                 unused secrets stay on the CA's node), MembersLearned (what this node was told),
                 ClusterLeft (this node's own leaving: no member follows it any more)

A kind this exod does not know (a newer member wrote it) is not sent: the sender cannot tell
whether it is local.

"No gap" is measured on the replicated kinds: the sender streams them in origin_seq order, each
with the origin_seq of the replicated event before it (`prev_origin_seq`); the follower holds
every replicated record it received, so its last origin_seq of that origin must equal `prev`.
"""

from __future__ import annotations

from typing import Literal

REPLICATED_KINDS: frozenset[str] = frozenset(
    {
        "NodeStarted",
        "NodeStopped",
        "RunnerSpawned",
        "RunnerReady",
        "RunnerFailed",
        "RunnerStopped",
        "ClusterEntered",
        "NodeJoined",
        "NodeRemoved",
        "InstancePlaced",
        "InstanceEnded",
    }
)

Liveness = Literal["alive", "unreachable"]


class Gap(Exception):
    """An event does not follow what the follower holds: one was missed (or sent twice)."""


def replicates(kind: str) -> bool:
    return kind in REPLICATED_KINDS


def check_next(held: int, prev: int, origin_seq: int) -> None:
    """Raise Gap unless an event numbered `origin_seq`, sent as following `prev`, is the next one
    after `held` (the last origin_seq of its origin the follower holds)."""
    if prev != held:
        raise Gap(f"expected the event after {held}, got one after {prev} ({origin_seq})")
    if origin_seq <= prev:
        raise Gap(f"event {origin_seq} does not come after {prev}")


def liveness(last_seen: float | None, now: float, timeout: float) -> Liveness:
    """A member is alive while a message from it (Hello, an event, a heartbeat) arrived within
    `timeout` seconds (EXOD_PEER_TIMEOUT); unreachable otherwise, and before any arrived."""
    if last_seen is None or now - last_seen > timeout:
        return "unreachable"
    return "alive"


def backoff(attempt: int, first: float = 0.25, most: float = 5.0) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0, 1, ...): doubling, bounded."""
    return float(min(most, first * 2 ** min(attempt, 16)))
