"""The pure parts of running a model split over members: which ranks a plan asks this node to
coordinate (rank 0 here or on a member, a model whole on a member), the split the ranks are
told, the version check, and how status shows instances."""

from __future__ import annotations

import pytest

from exoctl import render
from exod.cluster import instances, versions
from exod.cluster.placement import Plan, Rank, Refused
from exod.errors import ExoError
from exod.proto.exo.v1 import control_pb2

ME, OTHER = "n-aaaaaaaaaaaa", "n-bbbbbbbbbbbb"
RANKS = (Rank(0, ME, 4, 4, 300), Rank(1, OTHER, 0, 3, 400))


def test_a_split_with_rank_0_here_is_coordinated_here() -> None:
    assert instances._ranks_here(Plan(ranks=RANKS), ME) == RANKS
    assert instances._split(RANKS) == [1, 4]


def test_a_model_whole_here_needs_no_instance() -> None:
    assert instances._ranks_here(Plan(whole_on=ME, ranks=(Rank(0, ME, 0, 4, 700),)), ME) == ()


def test_a_model_whole_on_another_member_is_one_rank_coordinated_here() -> None:
    whole = (Rank(0, OTHER, 0, 4, 700),)
    assert instances._ranks_here(Plan(whole_on=OTHER, ranks=whole), ME) == whole
    assert instances._split(whole) == [5]


def test_a_split_without_this_node_is_coordinated_here_rank_0_on_a_member() -> None:
    third = "n-cccccccccccc"
    ranks = (Rank(0, OTHER, 3, 4, 300), Rank(1, third, 0, 2, 400))
    assert instances._ranks_here(Plan(ranks=ranks), ME) == ranks


@pytest.mark.parametrize(
    ("plan", "reason", "words"),
    [
        (Plan(refused=Refused("model_too_large", "too big")), "model_too_large", "too big"),
        (
            Plan(ranks=(Rank(0, OTHER, 4, 4, 1), Rank(1, ME, 0, 3, 1))),
            "invalid_argument",
            f"this node ({ME}) takes part in a split only as rank 0: put it first in --on",
        ),
    ],
    ids=["refused", "this node a rank other than 0"],
)
def test_what_is_not_coordinated_here_is_refused(plan: Plan, reason: str, words: str) -> None:
    with pytest.raises(ExoError) as refused:
        instances._ranks_here(plan, ME)
    assert refused.value.reason == reason
    assert words in refused.value.message


def test_versions_that_differ_are_named() -> None:
    here = {"exod": "0.1.0", "mlx": "0.29.0", "mlx-lm": "0.32.0"}
    assert versions.mismatch(dict(here), here) is None
    assert versions.mismatch({}, here) is None  # an earlier coordinator sends none
    theirs = {**here, "mlx": "0.28.0"}
    assert versions.mismatch(theirs, here) == "mlx 0.28.0 there, 0.29.0 here"
    assert set(versions.ours()) == {"exod", "mlx", "mlx-lm"}


def test_status_shows_each_rank_of_an_instance() -> None:
    info = control_pb2.InstanceInfo(id="i-1", model="big", state="running", coordinator=ME)
    info.ranks.add(rank=0, node=ME, runner="r-1", first_layer=4, last_layer=4, state="ready")
    info.ranks.add(
        rank=1,
        node=OTHER,
        first_layer=0,
        last_layer=3,
        state="spawned",
        weights_sent=48_500_000,
        weights_total=48_500_000,
    )
    sent = {"weights_sent": 48_500_000, "weights_total": 48_500_000}
    assert render.instance_json(info) == {
        "id": "i-1",
        "model": "big",
        "state": "running",
        "coordinator": ME,
        "ranks": [
            {"rank": 0, "node": ME, "runner": "r-1", "layers": [4, 4], "state": "ready"}
            | {"weights_sent": 0, "weights_total": 0},
            {"rank": 1, "node": OTHER, "runner": None, "layers": [0, 3], "state": "spawned"} | sent,
        ],
    }
    lines = render.instance_lines([info])
    assert lines[0] == "INSTANCES"
    assert lines[1].split() == ["INSTANCE", "MODEL", "RANK", "NODE", "LAYERS", "RUNNER", "STATE"]
    assert lines[2].split() == ["i-1", "big", "0", ME, "4-4", "r-1", "ready"]
    assert lines[3].split() == ["i-1", "big", "1", OTHER, "0-3", "-", "spawned"]
    assert render.instance_lines([]) == []


def test_status_shows_how_far_a_ranks_weights_are_sent() -> None:
    info = control_pb2.InstanceInfo(id="i-1", model="big", state="starting", coordinator=ME)
    info.ranks.add(rank=1, node=OTHER, first_layer=0, last_layer=3, state="sending")
    assert render.instance_lines([info])[2].split()[-1] == "sending"  # its size not known yet
    info.ranks[0].weights_sent, info.ranks[0].weights_total = 12_000_000, 48_500_000
    assert render.instance_lines([info])[2].split()[-4:] == ["sending", "12.0/48.5", "MB", "(24%)"]
