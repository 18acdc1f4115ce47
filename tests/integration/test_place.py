"""`exoctl place` against real exods: alone, then as a two-node cluster on loopback.

Each node's EXOD_MAX_RUNNER_MEMORY is set so that the "big" generated model fits on neither
alone but split over both, and the small one fits anywhere: rooms that do not move with the
machine's free memory, so the plans are exact. The tests of this module run in order: A alone
(whole, JSON, a name, an unknown model, a refusal), then A and B in a cluster (a split from
either side, forced placements, an architecture mlx-lm cannot split), then B restarted with all
of its memory reserved, which A learns over mutual TLS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exoctl.render import human_bytes
from exod.models.shape import Shape, read_shape
from exod.runners.admission import estimate
from tests.daemon import Daemon, Result, wait_until
from tests.httpapi import free_port
from tests.models import demo_model

PEER_TIMEOUT_S = 2.0
BIG = {"num_layers": 4, "hidden_size": 256, "intermediate_size": 512}


def rank_need(shape: Shape, first: int, last: int) -> int:
    return estimate(shape.bytes_of(first, last) + shape.shared_bytes)


@dataclass
class Cluster:
    a: Daemon
    b: Daemon
    small: Path
    big: Path
    shape: Shape  # the big one's
    cap: int

    def id(self, d: Daemon) -> str:
        return str(d.status()["node_id"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("place")
    big = demo_model("qwen2", **BIG)
    shape = read_shape(big)
    # Room for half the big model's layers beside what every rank keeps, not for all of them.
    cap = rank_need(shape, 0, 1) + (1 << 20)
    assert estimate(shape.total_bytes) > cap

    def node(name: str, address: str) -> Daemon:
        return Daemon.create(
            root / name,
            EXOD_PEER_BIND=address,
            EXOD_PEER_PORT=str(free_port()),
            EXOD_JOIN_PORT=str(free_port()),
            EXOD_PEER_TIMEOUT=str(PEER_TIMEOUT_S),
            EXOD_MAX_RUNNER_MEMORY=str(cap),
            EXOD_NODE_NAME=name,
        )

    made = Cluster(node("a", "127.0.0.2"), node("b", "127.0.0.3"), demo_model(), big, shape, cap)
    try:
        made.a.start()
        yield made
    finally:
        for d in (made.a, made.b):
            d.cleanup()


def refused(result: Result, code: int) -> str:
    """The one stderr line of a refused command (exit `code`, no traceback)."""
    assert result.code == code, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("exoctl: "), result
    return lines[0]


# --- one node -----------------------------------------------------------------------------------


def test_alone_the_whole_model_on_this_node(cluster: Cluster) -> None:
    a = cluster.a
    me = cluster.id(a)
    need = estimate(read_shape(cluster.small).total_bytes)
    result = a.ok("place", str(cluster.small))
    assert result.text == f"whole on {me} (a): layers 0-1, {human_bytes(need)}\n"
    assert result.stderr == ""


def test_json_contract(cluster: Cluster) -> None:
    a = cluster.a
    me = cluster.id(a)
    result = a.ok("place", str(cluster.small), "--json")
    assert json.loads(result.stdout) == {
        "model": str(cluster.small),
        "whole_on": me,
        "ranks": [
            {
                "rank": 0,
                "node": me,
                "layers": [0, 1],
                "bytes": estimate(read_shape(cluster.small).total_bytes),
            }
        ],
        "refused": None,
    }
    assert result.stdout.count(b"\n") == 1 and result.stderr == ""


def test_a_registered_name(cluster: Cluster) -> None:
    a = cluster.a
    a.ok("models", "add", "tiny", str(cluster.small))
    plan = json.loads(a.ok("place", "tiny", "--json").stdout)
    assert plan["model"] == "tiny" and plan["whole_on"] == cluster.id(a)


def test_an_unknown_model_is_66(cluster: Cluster) -> None:
    a = cluster.a
    result = a.exoctl("place", "nosuch", "--json")
    line = refused(result, 66)
    assert "no registered model named 'nosuch'" in line
    assert result.stdout == b""
    line = refused(a.exoctl("place", "/nonexistent/model"), 66)
    assert "/nonexistent/model" in line


def test_alone_too_large_is_refused_with_65_and_its_json(cluster: Cluster) -> None:
    a = cluster.a
    need = estimate(cluster.shape.total_bytes)
    result = a.exoctl("place", str(cluster.big), "--json")
    line = refused(result, 65)
    plan = json.loads(result.stdout)
    assert plan["whole_on"] is None and plan["ranks"] == []
    assert plan["refused"]["reason"] == "model_too_large"
    message = plan["refused"]["message"]
    assert line == f"exoctl: {message}."
    assert f"needs about {need / (1 << 20):.0f} MiB" in message
    assert f"this node has {cluster.cap / (1 << 20):.0f} MiB for a runner" in message
    assert "add a member to split it over (`exoctl cluster invite`)" in message
    # Without --json: nothing on stdout.
    plain = a.exoctl("place", str(cluster.big))
    assert refused(plain, 65) == line and plain.stdout == b""


def test_on_is_checked(cluster: Cluster) -> None:
    a = cluster.a
    line = refused(a.exoctl("place", str(cluster.small), "--on", "n-x,n-x"), 64)
    assert "n-x is named twice" in line
    line = refused(a.exoctl("place", str(cluster.small), "--on", "n-000000000000"), 66)
    assert "n-000000000000 is not a member of this cluster" in line


# --- two nodes ----------------------------------------------------------------------------------


def test_two_nodes_split_the_model_neither_holds_alone(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    b.start()
    a.ok("cluster", "init")
    b.ok("cluster", "join", a.ok("cluster", "invite").text.strip())
    ida, idb = cluster.id(a), cluster.id(b)
    assert wait_until(lambda: _heard(a, idb), 20, poll=0.2), a.log()
    assert wait_until(lambda: _heard(b, ida), 20, poll=0.2), b.log()
    shape = cluster.shape
    plan = json.loads(a.ok("place", str(cluster.big), "--json").stdout)
    # Even rooms: two layers each; this node (A) is rank 0 and holds the last ones.
    assert plan == {
        "model": str(cluster.big),
        "whole_on": None,
        "ranks": [
            {"rank": 0, "node": ida, "layers": [2, 3], "bytes": rank_need(shape, 2, 3)},
            {"rank": 1, "node": idb, "layers": [0, 1], "bytes": rank_need(shape, 0, 1)},
        ],
        "refused": None,
    }
    assert a.ok("place", str(cluster.big)).text.splitlines() == [
        "RANK  NODE                LAYERS  MEMORY",
        f"0     {ida} (a)  2-3     {human_bytes(rank_need(shape, 2, 3))}",
        f"1     {idb} (b)  0-1     {human_bytes(rank_need(shape, 0, 1))}",
    ]
    # Asked on B, B is rank 0.
    ranks = json.loads(b.ok("place", str(cluster.big), "--json").stdout)["ranks"]
    assert [(r["rank"], r["node"], r["layers"]) for r in ranks] == [
        (0, idb, [2, 3]),
        (1, ida, [0, 1]),
    ]
    # What fits here stays here.
    assert json.loads(a.ok("place", str(cluster.small), "--json").stdout)["whole_on"] == ida


def test_forced_placements(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    ida, idb = cluster.id(a), cluster.id(b)
    plan = json.loads(a.ok("place", str(cluster.small), "--on", idb, "--json").stdout)
    assert plan["whole_on"] == idb
    ranks = json.loads(a.ok("place", str(cluster.big), "--on", f"{idb},{ida}", "--json").stdout)
    assert [(r["rank"], r["node"], r["layers"]) for r in ranks["ranks"]] == [
        (0, idb, [2, 3]),
        (1, ida, [0, 1]),
    ]
    line = refused(a.exoctl("place", str(cluster.big), "--on", idb), 65)
    assert f"{idb} (b) has {cluster.cap / (1 << 20):.0f} MiB for a runner" in line
    # Split though it would fit whole: --on is obeyed.
    plan = json.loads(a.ok("place", str(cluster.small), "--on", f"{ida},{idb}", "--json").stdout)
    assert [(r["rank"], r["node"], r["layers"]) for r in plan["ranks"]] == [
        (0, ida, [1, 1]),
        (1, idb, [0, 0]),
    ]


def test_an_architecture_mlx_lm_cannot_split(cluster: Cluster) -> None:
    a = cluster.a
    llama = demo_model("llama", **BIG)
    result = a.exoctl("place", str(llama), "--json")
    line = refused(result, 65)
    assert "mlx-lm has no pipeline for llama, so it cannot be split over members" in line
    assert json.loads(result.stdout)["refused"]["reason"] == "model_too_large"


def test_a_members_reserve_reaches_the_others(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    idb = cluster.id(b)
    b.stop()
    b.env["EXOD_RESERVED_MEMORY"] = "100%"  # B keeps all of its memory from runners
    b.start()
    want = f"the 2 reachable members have {cluster.cap / (1 << 20):.0f} MiB for runners in all"
    outcome: dict[str, Any] = {}

    def b_has_no_room() -> bool:
        result = a.exoctl("place", str(cluster.big), "--json")
        outcome["last"] = result
        return result.code == 65 and want in json.loads(result.stdout)["refused"]["message"]

    assert wait_until(b_has_no_room, 30, poll=0.5), outcome["last"]
    line = refused(a.exoctl("place", str(cluster.small), "--on", idb), 65)
    assert f"{idb} (b) has 0 MiB for a runner" in line


def _heard(viewer: Daemon, other: str) -> bool:
    for node in viewer.status()["nodes"]:
        if node["id"] == other:
            return bool(node["state"] == "alive" and node["memory_total_bytes"] > 0)
    return False
