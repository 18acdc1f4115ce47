"""classify: what a node found by mDNS is to this node, for every combination of what can differ
(own announcement, cluster, protocol version, node id); and explain's one line for each."""

from __future__ import annotations

import itertools

import pytest

from exod.cluster.candidates import Candidate, Me, Verdict, classify, explain

ME = Me(node_id="n-me", cluster_id="c-ours", proto="5.2")


def candidate(
    node_id: str = "n-peer", cluster_id: str = "c-ours", proto: str = "5.2", *, own: bool = False
) -> Candidate:
    return Candidate(
        node_id=node_id,
        cluster_id=cluster_id,
        proto=proto,
        addresses=("10.0.0.2",),
        port=52416,
        name=f"{node_id}._exod._tcp.local.",
        own=own,
    )


def expected(own: bool, same_cluster: bool, proto: str, same_id: bool) -> Verdict:
    """The rule, spelled out independently of classify's code."""
    if own:
        return Verdict.SELF
    if not same_cluster:
        return Verdict.OTHER_CLUSTER
    if proto not in SPOKEN:
        return Verdict.OTHER_PROTO
    if same_id:
        return Verdict.DUPLICATE_ID
    return Verdict.MEMBER


# Versions a node speaking 5.2 works with (the same MAJOR: a MINOR only adds fields), and some
# it does not, including the traps of comparing text ("55" starts with "5").
SPOKEN = ("5.2", "5.0", "5.9", "5", "5.10")
PROTOS = (*SPOKEN, "4.9", "6.0", "55.2", "15.2", "0.5", "")
COMBINATIONS = list(itertools.product((False, True), (False, True), PROTOS, (False, True)))


@pytest.mark.parametrize(("own", "same_cluster", "proto", "same_id"), COMBINATIONS)
def test_every_combination(own: bool, same_cluster: bool, proto: str, same_id: bool) -> None:
    found = candidate(
        node_id=ME.node_id if same_id else "n-peer",
        cluster_id=ME.cluster_id if same_cluster else "c-theirs",
        proto=proto,
        own=own,
    )
    assert classify(found, ME) is expected(own, same_cluster, proto, same_id)


def test_every_verdict_is_reachable() -> None:
    assert {expected(*combination) for combination in COMBINATIONS} == set(Verdict)


def test_the_plain_cases() -> None:
    assert classify(candidate(), ME) is Verdict.MEMBER
    assert classify(candidate(node_id="n-me", own=True), ME) is Verdict.SELF
    assert classify(candidate(cluster_id="c-theirs"), ME) is Verdict.OTHER_CLUSTER
    assert classify(candidate(node_id="n-me"), ME) is Verdict.DUPLICATE_ID


def test_a_release_that_only_adds_fields_still_works_another_major_does_not() -> None:
    assert classify(candidate(proto="5.1"), ME) is Verdict.MEMBER  # one release behind
    assert classify(candidate(proto="5.3"), ME) is Verdict.MEMBER  # ... seen from that member
    assert classify(candidate(proto="4.9"), ME) is Verdict.OTHER_PROTO
    assert classify(candidate(proto="6.0"), ME) is Verdict.OTHER_PROTO


def test_another_cluster_is_refused_whatever_else_it_shares() -> None:
    # Its ids and versions are none of our business: our own id there is not a duplicate.
    found = candidate(node_id="n-me", cluster_id="c-theirs", proto="99.0")
    assert classify(found, ME) is Verdict.OTHER_CLUSTER


def test_ourselves_under_a_renamed_service_is_still_ourselves() -> None:
    # `own` comes from the service this process registered, whatever its name became.
    found = Candidate(
        "n-me", "c-ours", "5.2", ("10.0.0.1",), 52416, "n-me-2._exod._tcp.local.", True
    )
    assert classify(found, ME) is Verdict.SELF


@pytest.mark.parametrize(
    ("found", "words"),
    [
        (candidate(node_id="n-me", own=True), ["node n-me (10.0.0.2) is this node"]),
        (candidate(), ["node n-peer (10.0.0.2)", "member once it authenticates"]),
        (
            candidate(cluster_id="c-theirs"),
            ["cluster c-theirs, not to this cluster c-ours", "refused", "exoctl cluster leave"],
        ),
        (
            candidate(proto="2.0"),
            ["peer protocol 2.0, this node 5.2", "refused", "upgrade exod on that node"],
        ),
        (candidate(proto="9.1"), ["peer protocol 9.1, this node 5.2", "exod on this node"]),
        (candidate(proto="x"), ["peer protocol x, this node 5.2", "the older of the two"]),
        (candidate(node_id="n-me"), ["this node's own id", "refused, not merged", "fresh home"]),
    ],
)
def test_explain_says_what_it_is_and_what_to_do(found: Candidate, words: list[str]) -> None:
    line = explain(found, ME)
    assert "\n" not in line
    for word in words:
        assert word in line, line


def test_explain_without_an_address() -> None:
    found = Candidate("n-peer", "c-ours", "5.2", (), 52416)
    assert explain(found, ME).startswith("node n-peer (no address) ")
