"""A model split over two real exods on loopback (127.0.0.2 and .3), run and stopped as one.

A makes the cluster and holds the model; B joins without its files. `exoctl run --on A,B` on A
places the model unevenly (B's runner cap is smaller), sends B its layers, starts both ranks,
and streams rank 0's text, which must equal, byte for byte, what A alone makes of the same
model (through exoctl and through the HTTP API). Killing B's rank runner mid-generation, or B's
exod, ends every rank on both nodes within EXOD_KILL_GRACE + 2 s; the client exits 75 and the
next run works. SIGKILL of A's exod ends B's rank when its lease lapses, and A's next start
logs the instance's end. The tests run in order.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from exod.models.shape import read_shape
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc
from exod.runners.admission import estimate
from tests.daemon import Daemon, Result, pids_alive, wait_until
from tests.httpapi import free_port, request
from tests.models import copy_model, demo_model

PEER_TIMEOUT_S = 3.0
KILL_GRACE_S = 1.0
LAYERS = 5
PROMPT = "Once upon a time"
LONG_RUN_TOKENS = "100000"
GiB = 1 << 30


@dataclass
class Node:
    daemon: Daemon
    address: str
    http_port: int = 0

    @property
    def id(self) -> str:
        return str(self.daemon.status()["node_id"])


@dataclass
class Pair:
    a: Node
    b: Node
    model: Path


def _node(home: Path, address: str, ring_port: int, cap: str) -> Node:
    http_port = free_port()
    daemon = Daemon.create(
        home,
        EXOD_PEER_BIND=address,
        EXOD_PEER_PORT=str(free_port()),
        EXOD_JOIN_PORT=str(free_port()),
        EXOD_RING_PORT=str(ring_port),
        EXOD_PEER_TIMEOUT=str(PEER_TIMEOUT_S),
        EXOD_KILL_GRACE=str(KILL_GRACE_S),
        EXOD_MAX_RUNNER_MEMORY=cap,
        EXOD_HTTP_PORT=str(http_port),
    )
    return Node(daemon, address, http_port)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("split")
    ring = free_port()
    made = Pair(
        _node(root / "a", "127.0.0.2", ring, "8G"),
        _node(root / "b", "127.0.0.3", ring, "2G"),
        demo_model("qwen2", num_layers=LAYERS),
    )
    try:
        made.a.daemon.start()
        made.b.daemon.start()
        made.a.daemon.ok("cluster", "init")
        token = made.a.daemon.ok("cluster", "invite").text.strip()
        made.b.daemon.ok("cluster", "join", token)
        a_id, b_id = made.a.id, made.b.id
        assert wait_until(lambda: _state(made.a, b_id) == "alive", 15, poll=0.2)
        assert wait_until(lambda: _state(made.b, a_id) == "alive", 15, poll=0.2)
        made.a.daemon.ok("models", "add", "split", str(made.model))
        yield made
    finally:
        for n in (made.a, made.b):
            n.daemon.cleanup()


def _state(viewer: Node, node_id: str) -> str:
    for n in viewer.daemon.status()["nodes"]:
        if n["id"] == node_id:
            return str(n["state"])
    return ""


def _on(p: Pair) -> str:
    return f"{p.a.id},{p.b.id}"


def _alive_runners(node: Node) -> list[dict[str, Any]]:
    return [r for r in node.daemon.status()["runners"] if r["state"] in ("ready", "running")]


def _all_gone(p: Pair) -> bool:
    """No live runner on either node (a stopped exod's runners by their pids)."""
    for n in (p.a, p.b):
        if not n.daemon.alive():
            continue
        if any(r["state"] in _LIVE for r in n.daemon.status()["runners"]):
            return False
    return True


_LIVE = ("spawning", "ready", "running", "loading")


def _kill_instance(p: Pair) -> None:
    for instance in p.a.daemon.status()["instances"]:
        p.a.daemon.ok("kill", instance["id"])
    assert wait_until(lambda: _all_gone(p), 10, poll=0.2)


def _grpc_run(node: Node, *on: str) -> list[control_pb2.RunReply]:
    """Every reply of a run of the split model, as exod sends it over the control socket."""
    request = control_pb2.RunRequest(model="split", prompt=PROMPT, raw=True, max_tokens=30)
    request.on.extend(on[1].split(",") if on else [])
    with grpc.insecure_channel(f"unix:{node.daemon.socket}") as channel:
        return list(control_pb2_grpc.ControlStub(channel).Run(request, timeout=120))


def _whole_text(p: Pair) -> str:
    """What A alone makes of the same model (a copy, so that no split runner is reused)."""
    alone = copy_model(p.model)
    out = p.a.daemon.ok("run", str(alone), PROMPT, "--raw", "--max-tokens", "30").text
    for r in _alive_runners(p.a):
        if r["model"] == str(alone):
            p.a.daemon.ok("kill", r["id"])
    return out


def test_place_splits_unevenly(pair: Pair) -> None:
    plan = json.loads(pair.a.daemon.ok("place", "split", "--on", _on(pair), "--json").stdout)
    assert plan["refused"] is None, plan
    assert [(r["rank"], r["node"]) for r in plan["ranks"]] == [(0, pair.a.id), (1, pair.b.id)]
    counts = [r["layers"][1] - r["layers"][0] + 1 for r in plan["ranks"]]
    assert sum(counts) == LAYERS and counts[0] > counts[1], counts


def test_split_text_equals_the_single_node_text(pair: Pair) -> None:
    whole = _whole_text(pair)
    assert whole.strip()
    # The first run starts the instance: B gets its layers, and the run is told how that goes
    # (exoctl shows it on a terminal's status line) before it starts.
    replies = _grpc_run(pair.a, "--on", _on(pair))
    progress = [r.progress for r in replies if r.WhichOneof("msg") == "progress"]
    phases = [p.phase for p in progress]
    assert phases[0] == f"writing out the layers for {pair.b.id}", phases
    sent = [p for p in progress if p.phase == f"sending weights to {pair.b.id}"]
    assert sent and sent[-1].unit == "bytes"
    assert 0 < sent[-1].current == sent[-1].total, sent[-1]
    first = [i for i, r in enumerate(replies) if r.WhichOneof("msg") == "started"]
    assert first and all(i < first[0] for i, r in enumerate(replies) if r.progress.unit)
    text = "".join(r.tokens.text for r in replies if r.WhichOneof("msg") == "tokens")
    assert text + "\n" == whole
    split = pair.a.daemon.ok(
        "run", "split", PROMPT, "--raw", "--max-tokens", "30", "--on", _on(pair)
    )
    assert split.text == whole
    assert split.stderr == ""
    # One instance, rank 0 here and rank 1 on B, whose runner runs from B's cache.
    (instance,) = pair.a.daemon.status()["instances"]
    assert instance["model"] == "split" and instance["coordinator"] == pair.a.id
    assert [(r["rank"], r["node"]) for r in instance["ranks"]] == [(0, pair.a.id), (1, pair.b.id)]
    (b_runner,) = _alive_runners(pair.b)
    assert "/cache/models/" in b_runner["model_path"]
    assert instance["ranks"][1]["runner"] == b_runner["id"]
    # --json's done line names the instance.
    lines = pair.a.daemon.ok(
        "run", "split", PROMPT, "--raw", "--max-tokens", "30", "--json"
    ).json_lines()
    assert lines[-1]["type"] == "done" and lines[-1]["instance"] == instance["id"]
    # A run without --on finds the model loaded: the same instance serves it.
    again = pair.a.daemon.ok("run", "split", PROMPT, "--raw", "--max-tokens", "30")
    assert again.text == whole
    # And the HTTP API alike.
    answer = request(
        pair.a.http_port,
        "POST",
        "/v1/completions",
        {"model": "split", "prompt": PROMPT, "max_tokens": 30, "temperature": 0},
    )
    assert answer.status == 200, answer
    assert answer.json()["choices"][0]["text"] + "\n" == whole


def test_a_second_split_model_is_refused_with_75_while_one_runs(pair: Pair) -> None:
    # One ring port per node: neither the coordinator nor a member of a running instance
    # starts another.
    other = copy_model(pair.model)
    (instance,) = pair.a.daemon.status()["instances"]
    before = [r["id"] for r in _alive_runners(pair.a)]
    for node, on in ((pair.a, _on(pair)), (pair.b, f"{pair.b.id},{pair.a.id}")):
        result = node.daemon.exoctl(
            "run", str(other), PROMPT, "--raw", "--max-tokens", "5", "--on", on
        )
        assert result.code == 75, result
        assert result.stdout == b""
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(
            f"exoctl: this node runs a rank of instance {instance['id']} already"
        ), line
        assert "one split model at a time" in line
    # Nothing of them was started; the first instance runs on.
    assert [r["id"] for r in _alive_runners(pair.a)] == before
    assert [i["id"] for i in pair.a.daemon.status()["instances"]] == [instance["id"]]
    assert pair.b.daemon.status()["instances"] == []


def test_kill_of_the_instance_ends_every_rank(pair: Pair) -> None:
    _kill_instance(pair)
    kinds = [e["kind"] for e in pair.a.daemon.events()]
    assert "InstancePlaced" in kinds and "InstanceEnded" in kinds


def _long_split_run(p: Pair) -> Any:
    run = p.a.daemon.exoctl_bg(
        "run",
        "split",
        "Tell me a story",
        "--raw",
        "--json",
        "--max-tokens",
        LONG_RUN_TOKENS,
        "--on",
        _on(p),
    )
    assert run.stdout is not None
    line = run.stdout.readline()
    while b'"type":"token"' not in line:
        assert line, run.stderr.read() if run.stderr else ""
        line = run.stdout.readline()
    return run


def _ends_as_one(p: Pair, run: Any, started: float) -> Result:
    out, err = run.communicate(timeout=30)
    result = Result(run.returncode, out, err.decode(errors="replace"))
    assert result.code == 75, result
    assert wait_until(lambda: _all_gone(p), KILL_GRACE_S + 2, poll=0.1), (
        p.a.daemon.status()["runners"],
        p.b.daemon.status()["runners"] if p.b.daemon.alive() else "B stopped",
    )
    assert time.monotonic() - started < KILL_GRACE_S + 2 + 5
    return result


def test_sigkill_of_a_members_rank_runner_ends_every_rank(pair: Pair) -> None:
    run = _long_split_run(pair)
    (b_runner,) = _alive_runners(pair.b)
    started = time.monotonic()
    os.kill(b_runner["pid"], signal.SIGKILL)
    result = _ends_as_one(pair, run, started)
    assert "rank_failed" in result.stderr or "rank" in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert pids_alive([b_runner["pid"]]) == []
    # The next run works.
    assert pair.a.daemon.ok(
        "run", "split", PROMPT, "--raw", "--max-tokens", "30", "--on", _on(pair)
    ).text.strip()
    _kill_instance(pair)


def test_sigkill_of_rank_0_ends_every_rank(pair: Pair) -> None:
    run = _long_split_run(pair)
    (a_runner,) = _alive_runners(pair.a)
    (b_runner,) = _alive_runners(pair.b)
    started = time.monotonic()
    os.kill(a_runner["pid"], signal.SIGKILL)
    result = _ends_as_one(pair, run, started)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert pids_alive([b_runner["pid"]]) == []
    ended = [e for e in pair.a.daemon.events() if e["kind"] == "InstanceEnded"]
    assert ended[-1]["reason"] == "rank_failed", ended[-1]
    assert pair.a.daemon.status()["instances"] == []


def test_sigkill_of_a_members_exod_ends_every_rank(pair: Pair) -> None:
    run = _long_split_run(pair)
    b_pids = pair.b.daemon.runner_pids()
    started = time.monotonic()
    pair.b.daemon.stop(signal.SIGKILL)
    _ends_as_one(pair, run, started)
    assert wait_until(lambda: pids_alive(b_pids) == [], KILL_GRACE_S + 2, poll=0.1)
    pair.b.daemon.start()
    b_id = pair.b.id
    assert wait_until(lambda: _state(pair.a, b_id) == "alive", 15, poll=0.2)
    assert pair.a.daemon.ok(
        "run", "split", PROMPT, "--raw", "--max-tokens", "30", "--on", _on(pair)
    ).text.strip()
    _kill_instance(pair)


def test_sigkill_of_the_coordinators_exod_ends_every_rank_and_its_restart_closes_the_instance(
    pair: Pair,
) -> None:
    run = _long_split_run(pair)
    (instance,) = pair.a.daemon.status()["instances"]
    a_pids, b_pids = pair.a.daemon.runner_pids(), pair.b.daemon.runner_pids()
    assert a_pids and b_pids
    pids = a_pids + b_pids
    started = time.monotonic()
    pair.a.daemon.stop(signal.SIGKILL)
    out, _ = run.communicate(timeout=30)
    assert run.returncode != 0, out
    # B's rank ends itself once its lease lapses; A's rank ends with A's exod.
    assert wait_until(lambda: pids_alive(pids) == [], PEER_TIMEOUT_S + 2, poll=0.1)
    assert time.monotonic() - started < PEER_TIMEOUT_S + 2 + 1
    pair.a.daemon.start()
    ended = [e for e in pair.a.daemon.events() if e["kind"] == "InstanceEnded"]
    assert (ended[-1]["instance_id"], ended[-1]["reason"]) == (instance["id"], "interrupted")
    assert pair.a.daemon.status()["instances"] == []
    b_id = pair.b.id
    assert wait_until(lambda: _state(pair.a, b_id) == "alive", 15, poll=0.2)
    assert pair.a.daemon.ok(
        "run", "split", PROMPT, "--raw", "--max-tokens", "30", "--on", _on(pair)
    ).text.strip()
    _kill_instance(pair)


def _ring_port(p: Pair) -> str:
    return p.a.daemon.env["EXOD_RING_PORT"]


def test_a_model_whole_on_the_member_runs_there_for_this_node(pair: Pair) -> None:
    whole = _whole_text(pair)
    b_id = pair.b.id
    # --on B: B gets the whole model in its cache, and runs it for A; A streams its text.
    there = pair.a.daemon.ok("run", "split", PROMPT, "--raw", "--max-tokens", "30", "--on", b_id)
    assert there.text == whole
    (instance,) = pair.a.daemon.status()["instances"]
    assert [(r["rank"], r["node"]) for r in instance["ranks"]] == [(0, b_id)]
    assert instance["ranks"][0]["layers"] == [0, LAYERS - 1]
    assert _alive_runners(pair.a) == []
    (b_runner,) = _alive_runners(pair.b)
    assert "/cache/models/" in b_runner["model_path"]
    # A later run without --on finds the instance; --json's done line names it.
    lines = pair.a.daemon.ok(
        "run", "split", PROMPT, "--raw", "--max-tokens", "30", "--json"
    ).json_lines()
    assert "".join(x["text"] for x in lines if x["type"] == "token") + "\n" == whole
    assert lines[-1]["instance"] == instance["id"]
    # B's runner killed mid-run: the client exits 75 and the instance ends as one.
    run = pair.a.daemon.exoctl_bg(
        "run", "split", "Tell me a story", "--raw", "--max-tokens", LONG_RUN_TOKENS
    )
    assert run.stdout is not None
    run.stdout.read(1)  # a token has come
    started = time.monotonic()
    os.kill(b_runner["pid"], signal.SIGKILL)
    result = _ends_as_one(pair, run, started)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert pair.a.daemon.status()["instances"] == []
    ended = [e for e in pair.a.daemon.events() if e["kind"] == "InstanceEnded"]
    assert ended[-1]["instance_id"] == instance["id"], ended[-1]


def test_a_model_a_member_runs_for_itself_is_run_there_on_its_runner(pair: Pair) -> None:
    """B runs the model for a client of its own; A's runs of the same content (found by B's
    replicated RunnerSpawned) join that runner: no copy is sent, no second runner starts."""
    whole = _whole_text(pair)
    b_id = pair.b.id
    assert pair.b.daemon.ok("run", str(pair.model), PROMPT, "--raw", "--max-tokens", "30").text
    (b_runner,) = _alive_runners(pair.b)

    def a_knows() -> bool:
        return any(n["id"] == b_id and n["runners"] == 1 for n in pair.a.daemon.status()["nodes"])

    assert wait_until(a_knows, 10, poll=0.2)
    plan = json.loads(pair.a.daemon.ok("place", "split", "--json").stdout)
    assert plan["whole_on"] == b_id, plan  # loaded there comes first
    for args in ((), ("--on", b_id)):
        there = pair.a.daemon.ok("run", "split", PROMPT, "--raw", "--max-tokens", "30", *args)
        assert there.text == whole
    assert [r["id"] for r in _alive_runners(pair.b)] == [b_runner["id"]]
    assert _alive_runners(pair.a) == [] and pair.a.daemon.status()["instances"] == []
    # Once B's runner is gone, A's next run is placed anew (here: A has room for it whole).
    pair.b.daemon.ok("kill", b_runner["id"])
    assert wait_until(lambda: not a_knows(), 10, poll=0.2)
    assert pair.a.daemon.ok("run", "split", PROMPT, "--raw", "--max-tokens", "30").text == whole
    (a_runner,) = _alive_runners(pair.a)
    pair.a.daemon.ok("kill", a_runner["id"])


def test_a_model_no_node_holds_whole_is_split_without_being_asked(pair: Pair) -> None:
    """Each node's runner cap holds the runtime and three or four of a model's five layers
    (with the tensors every rank keeps), never all five: a run without --on splits it over A
    and B. (Layers of some MiB each, so that a run's KV cache fits beside three of them.) Then
    B alone gets room for it whole, and the run goes there. The last test: both exods are
    restarted with those caps."""
    model = demo_model("qwen2", num_layers=LAYERS, hidden_size=256, intermediate_size=1024)
    whole = pair.a.daemon.ok("run", str(model), PROMPT, "--raw", "--max-tokens", "30").text
    for r in _alive_runners(pair.a):
        pair.a.daemon.ok("kill", r["id"])
    shape = read_shape(model)
    cap = (estimate(shape.shared_bytes + shape.bytes_of(0, 2)) + estimate(shape.total_bytes)) // 2
    assert estimate(shape.total_bytes) > cap  # the premise: it fits on neither node whole
    for node in (pair.b, pair.a):
        node.daemon.stop()
        node.daemon.env["EXOD_MAX_RUNNER_MEMORY"] = str(cap)
        node.daemon.start()
    a_id, b_id = pair.a.id, pair.b.id
    assert wait_until(lambda: _state(pair.a, b_id) == "alive", 15, poll=0.2)
    plan = json.loads(pair.a.daemon.ok("place", str(model), "--json").stdout)
    assert plan["whole_on"] is None and plan["refused"] is None, plan
    assert [(r["rank"], r["node"]) for r in plan["ranks"]] == [(0, a_id), (1, b_id)]
    split = pair.a.daemon.ok("run", str(model), PROMPT, "--raw", "--max-tokens", "30")
    assert split.text == whole
    (instance,) = pair.a.daemon.status()["instances"]
    assert [r["layers"] for r in instance["ranks"]] == [r["layers"] for r in plan["ranks"]]
    _kill_instance(pair)
    # B with room for it whole: a run on A (which has none) runs it whole on B, unasked.
    pair.b.daemon.stop()
    pair.b.daemon.env["EXOD_MAX_RUNNER_MEMORY"] = "8G"
    pair.b.daemon.start()

    def placed_on_b() -> bool:  # once A has heard B's new cap
        plan = json.loads(pair.a.daemon.ok("place", str(model), "--json").stdout)
        return bool(plan["whole_on"] == b_id)

    assert wait_until(placed_on_b, 15, poll=0.5)
    there = pair.a.daemon.ok("run", str(model), PROMPT, "--raw", "--max-tokens", "30")
    assert there.text == whole
    (instance,) = pair.a.daemon.status()["instances"]
    assert [r["node"] for r in instance["ranks"]] == [b_id]
    _kill_instance(pair)
