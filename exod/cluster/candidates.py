"""What a node found by mDNS is to this node: itself, a candidate member, or a peer to refuse.

mDNS is unauthenticated: anything on the LAN can announce anything. A peer that classifies as a
member here is still only a candidate until it proves a certificate of this cluster over mTLS.
A peer that is refused is refused with a message that says why (another cluster, another
protocol version, our own id on another machine), never dropped silently: the person with three
Macs on a desk must be able to see why the fourth one is not listed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from exod.cluster.protocol import major


@dataclass(frozen=True)
class Candidate:
    """A node that announced itself by mDNS, as its TXT records and address records say."""

    node_id: str
    cluster_id: str
    proto: str  # the peer protocol's MAJOR.MINOR (exod.cluster.protocol)
    addresses: tuple[str, ...]
    port: int
    name: str = ""  # the mDNS service instance name: what a later goodbye names
    own: bool = False  # announced by this very process (not merely under our node id)


@dataclass(frozen=True)
class Me:
    """This node, as far as classifying what mDNS found needs to know."""

    node_id: str
    cluster_id: str
    proto: str


class Verdict(StrEnum):
    SELF = "self"
    MEMBER = "member"  # same cluster, a protocol we speak: connect, and let mTLS decide
    OTHER_CLUSTER = "other_cluster"
    OTHER_PROTO = "other_proto"
    DUPLICATE_ID = "duplicate_id"  # our node id, announced by someone else (a copied home)


def classify(candidate: Candidate, me: Me) -> Verdict:
    """What `candidate` is to `me`. The checks go from what makes the others meaningless: the
    cluster first (another cluster's ids and versions are none of our business), then the
    protocol (we could not even talk about ids with a node we cannot speak to). Protocols are
    compatible as the peer service's handshake judges them (exod.cluster.protocol): same MAJOR,
    so that a member one release behind keeps working and discovery never promises a peer that
    the handshake would refuse."""
    if candidate.own:
        return Verdict.SELF
    if candidate.cluster_id != me.cluster_id:
        return Verdict.OTHER_CLUSTER
    if major(candidate.proto) != major(me.proto):
        return Verdict.OTHER_PROTO
    if candidate.node_id == me.node_id:
        return Verdict.DUPLICATE_ID
    return Verdict.MEMBER


def explain(candidate: Candidate, me: Me) -> str:
    """One line for the log and for `status`: what the verdict on `candidate` means and, for a
    refusal, what to do about it."""
    where = ", ".join(candidate.addresses) or "no address"
    who = f"node {candidate.node_id} ({where})"
    match classify(candidate, me):
        case Verdict.SELF:
            return f"{who} is this node"
        case Verdict.MEMBER:
            return f"{who} announces this cluster; it is a member once it authenticates"
        case Verdict.OTHER_CLUSTER:
            return (
                f"{who} belongs to cluster {candidate.cluster_id}, not to this cluster "
                f"{me.cluster_id}: refused; to make it a member, run `exoctl cluster leave` "
                "there, then join it with a token from `exoctl cluster invite` here"
            )
        case Verdict.OTHER_PROTO:
            return (
                f"{who} speaks peer protocol {candidate.proto}, this node {me.proto}: refused; "
                f"upgrade exod on {_older(candidate.proto, me.proto)} so both run the same release"
            )
        case Verdict.DUPLICATE_ID:
            return (
                f"{who} announces this node's own id: its home is a copy of this one (a "
                "restored backup or a cloned machine): refused, not merged; give exod there a "
                "fresh home and join it with a token from `exoctl cluster invite`"
            )


def _older(theirs: str, ours: str) -> str:
    """Which side to upgrade, in words: the one whose MAJOR is lower."""
    try:
        return "that node" if int(major(theirs)) < int(major(ours)) else "this node"
    except ValueError:  # not numbers (not from a release of exod): say which is which
        return "the older of the two"


class Act(StrEnum):
    IGNORE = "ignore"  # this very process
    REMEMBER = "remember"  # this cluster, not a member (yet): keep its address, do not follow it
    FOLLOW = "follow"  # a member: follow it (also) at the addresses mDNS saw
    REFUSE = "refuse"  # listed as refused in `status`, never as a member


# The `reason` that `exoctl status` shows for each refusal (the contract in docs/cli.md).
REASONS = {
    Verdict.OTHER_CLUSTER: "other_cluster",
    Verdict.OTHER_PROTO: "protocol",
    Verdict.DUPLICATE_ID: "duplicate_id",
}


@dataclass(frozen=True)
class Decision:
    act: Act
    reason: str = ""  # with REFUSE: why, as `status` shows it


def decide(candidate: Candidate, me: Me, members: Collection[str]) -> Decision:
    """What to do with `candidate` given the ids of this cluster's members that the log knows.
    Announcing this cluster's id makes a node no member: only a NodeJoined (or a member's
    account of one) does, so a node that mDNS saw is followed only once the log lists it; its
    address is remembered meanwhile, for when it does."""
    verdict = classify(candidate, me)
    if verdict is Verdict.SELF:
        return Decision(Act.IGNORE)
    if verdict is Verdict.MEMBER:
        return Decision(Act.FOLLOW if candidate.node_id in members else Act.REMEMBER)
    return Decision(Act.REFUSE, REASONS[verdict])
