"""A model split over several real runner subprocesses joined by MLX's real ring over loopback.

The test plays each rank's daemon over its runner pipe (tests/runner_pipe.py): every rank gets a
Load with its Rank, rank 0 gets the requests, and what rank 0 streams is compared, byte for
byte, with what one runner holding the whole model streams for the same request.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from exod.models.inspect import kv_bytes_per_token, read_config
from exod.proto.exo.v1 import runner_pb2
from exod.runners.partial import write_partial
from exod.runners.ring import layer_range
from tests import models
from tests.httpapi import free_port
from tests.runner_pipe import Outcome, Runner

LAYERS = 5
PROMPTS = ["Once upon a time", "Grüße aus München — 東京 🦊 ça va?", "The quick brown fox"]
LONG_DECODE = 100_000  # tokens; far more than a test waits for, so only Cancel ends it


def model() -> Path:
    return models.demo_model("qwen2", num_layers=LAYERS)


def ring_hosts(n: int) -> list[str]:
    return [f"127.0.0.1:{free_port()}" for _ in range(n)]


@contextmanager
def ranks(
    split: Sequence[int],
    paths: Sequence[Path] | None = None,
    options: Sequence[dict[str, Any]] | None = None,
    ring_timeout_s: float = 60,
) -> Iterator[list[Runner]]:
    """One runner per rank, loaded together (each load waits for the ring), all Ready."""
    n = len(split)
    hosts = ring_hosts(n)
    runners = [Runner() for _ in range(n)]
    try:
        for r in runners:
            r.hello()
        ends: list[runner_pb2.FromRunner | None] = [None] * n

        def go(i: int) -> None:
            rank = runner_pb2.Rank(
                rank=i, size=n, split=split, hosts=hosts, ring_timeout_s=ring_timeout_s
            )
            path = paths[i] if paths else model()
            ends[i] = runners[i].load(path, rank=rank, **(options[i] if options else {}))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for end in ends:
            assert end is not None and end.WhichOneof("msg") == "ready", end
        yield runners
    finally:
        for r in runners:
            r.close()


def partial(tmp: Path, split: Sequence[int], rank: int) -> Path:
    name = f"rank{rank}-of-" + "-".join(map(str, split))
    return write_partial(model(), tmp / name, layer_range(split, rank))


@pytest.fixture(scope="module")
def single() -> Iterator[Runner]:
    """One runner with the whole model: the reference."""
    r = Runner()
    r.hello()
    assert r.load(model(), parallel=4).WhichOneof("msg") == "ready"
    yield r
    r.close()


@pytest.fixture(scope="module", params=[[1, 4], [4, 1]], ids=["1+4", "4+1"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[Runner], list[int]]]:
    """Two ranks, unevenly split; rank 1 (the first layers) loads from a partial directory that
    holds only its layers' tensors. Rank 0 runs 4 at once and keeps a prompt cache; rank 1 is
    told 1 at once and no cache (rank 0's parallel and the cache hits all ranks share rule)."""
    split: list[int] = request.param
    paths = [model(), partial(tmp_path_factory.mktemp("partial"), split, 1)]
    options = [{"parallel": 4, "prompt_cache_bytes": 64 << 20}, {"parallel": 1}]
    with ranks(split, paths, options) as runners:
        yield runners, split


def generate(r: Runner, **kwargs: Any) -> Outcome:
    fields: dict[str, Any] = {"request_id": "r", "max_tokens": 40} | kwargs
    req = runner_pb2.Generate(**fields)
    r.send(generate=req)
    return r.collect([req.request_id])[req.request_id]


def test_a_rank_loads_its_layers_then_waits_for_the_ring(
    pair: tuple[list[Runner], list[int]],
) -> None:
    runners, split = pair
    config = read_config(model())
    for i, r in enumerate(runners):
        phases = [(p.phase, p.current, p.total) for p in r.progress]
        layers = split[i]
        assert phases == [
            ("started", 0, 0),
            ("imported", 0, 0),
            *[("weights", k, layers) for k in range(1, layers + 1)],
            ("tokenizer", 0, 0),
            ("ring", 0, 0),
        ]
        # The KV cache of this rank's own layers only.
        assert r.ready is not None
        assert r.ready.kv_bytes_per_token == layers * kv_bytes_per_token(config) // LAYERS


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "chat"])
def test_rank_0_streams_exactly_the_single_runners_text(
    pair: tuple[list[Runner], list[int]], single: Runner, raw: bool
) -> None:
    runners, _ = pair
    for prompt in PROMPTS:
        split_run = generate(runners[0], prompt=prompt, raw=raw)
        whole_run = generate(single, prompt=prompt, raw=raw)
        assert split_run.text == whole_run.text
        assert split_run.text.strip()
        assert split_run.done.generation_tokens == whole_run.done.generation_tokens


def test_a_repeated_prompt_is_never_cached_unless_every_rank_has_it(
    pair: tuple[list[Runner], list[int]], single: Runner
) -> None:
    # Rank 0 keeps a prompt cache, rank 1 none: rank 0 must prefill everything too.
    runners, _ = pair
    first = generate(runners[0], prompt="Once upon a time there was", raw=True, request_id="a")
    again = generate(runners[0], prompt="Once upon a time there was", raw=True, request_id="b")
    assert again.done.cached_tokens == 0
    assert (
        first.text
        == again.text
        == generate(single, prompt="Once upon a time there was", raw=True).text
    )


def test_concurrent_requests_with_one_cancelled_keep_their_texts(
    pair: tuple[list[Runner], list[int]], single: Runner
) -> None:
    runners, _ = pair
    leader = runners[0]
    requests = [
        runner_pb2.Generate(request_id=f"r{i}", prompt=p, raw=i % 2 == 0, max_tokens=20 + 9 * i)
        for i, p in enumerate(PROMPTS)
    ]
    long = runner_pb2.Generate(request_id="long", prompt="Hi", raw=True, max_tokens=LONG_DECODE)
    leader.send(generate=long)
    for req in requests:
        leader.send(generate=req)
    while leader.recv().WhichOneof("msg") != "tokens":
        pass
    leader.send(cancel=runner_pb2.Cancel(request_id="long"))
    outcomes = leader.collect(["long", *(q.request_id for q in requests)], log=[])
    assert outcomes["long"].done.stop_reason == "cancelled"
    assert 0 < outcomes["long"].done.generation_tokens < LONG_DECODE
    for req in requests:
        single.send(generate=req)
    alone = single.collect([q.request_id for q in requests])
    for req in requests:
        assert outcomes[req.request_id].text == alone[req.request_id].text, req.request_id
    # The ranks still step together after the cancel.
    assert (
        generate(leader, prompt="Hello", raw=True).text
        == generate(single, prompt="Hello", raw=True).text
    )


def test_sampling_with_a_seed_draws_what_the_single_runner_draws(
    pair: tuple[list[Runner], list[int]], single: Runner
) -> None:
    runners, _ = pair
    options = {"prompt": "Once upon a time", "raw": True, "temperature": 1.5}
    for seed in (0, 7):
        split_run = generate(runners[0], has_seed=True, seed=seed, **options)
        assert split_run.text == generate(single, has_seed=True, seed=seed, **options).text
    # Without a seed, rank 0 picks one for every rank: the ranks keep stepping together.
    # (A random seed may draw the end of sequence early: any normal end will do.)
    unseeded = generate(runners[0], **options)
    assert unseeded.done.stop_reason in ("length", "stop")
    assert unseeded.done.generation_tokens > 0
    assert (
        generate(runners[0], prompt="Hello", raw=True).text
        == generate(single, prompt="Hello", raw=True).text
    )


def test_a_refused_request_is_answered_by_rank_0_alone(
    pair: tuple[list[Runner], list[int]],
) -> None:
    runners, _ = pair
    outcome = generate(runners[0], prompt="", raw=True)
    assert [m.WhichOneof("msg") for m in outcome.messages] == ["error"]
    assert outcome.end.error.reason == "prompt_empty"
    assert generate(runners[0], prompt="Hello", raw=True).done.stop_reason == "length"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# Rank 1 while decoding, rank 0 while idle: the other two cases take the same paths (the end-to-end
# tests kill a member's rank and rank 0 mid-generation too: tests/integration/test_split_run.py).
@pytest.mark.parametrize(
    ("victim", "busy"), [(1, True), (0, False)], ids=["rank-1-decoding", "rank-0-idle"]
)
def test_killing_a_rank_ends_the_other_with_rank_failed(victim: int, busy: bool) -> None:
    with ranks([1, 4]) as runners:
        leader, survivor = runners[0], runners[1 - victim]
        if busy:
            long = runner_pb2.Generate(
                request_id="long", prompt="Hi", raw=True, max_tokens=LONG_DECODE
            )
            leader.send(generate=long)
            while leader.recv().WhichOneof("msg") != "tokens":
                pass
        start = time.monotonic()
        os.kill(runners[victim].proc.pid, signal.SIGKILL)
        errors: list[runner_pb2.RunnerError] = []
        while not any(e.request_id == "" for e in errors):
            msg = survivor.recv(5)
            if msg.WhichOneof("msg") == "error":
                errors.append(msg.error)
        assert survivor.wait(5) == 75
        assert time.monotonic() - start < 5
        if survivor is leader and busy:  # rank 0 fails the request it owed, then itself
            assert [e.request_id for e in errors] == ["long", ""]
        else:
            assert [e.request_id for e in errors] == [""]
        assert {e.reason for e in errors} == {"rank_failed"}
        assert "\n" not in errors[-1].message
        assert "another rank" in errors[-1].message
        assert all(_gone(r.proc.pid) for r in runners)


def test_a_follower_told_to_stop_stops_and_rank_0_reports_rank_failed() -> None:
    with ranks([3, 2]) as runners:
        runners[1].send(shutdown=runner_pb2.Shutdown())
        assert runners[1].wait(10) == 0
        msg = runners[0].recv(10)
        assert msg.WhichOneof("msg") == "error"
        assert msg.error.reason == "rank_failed"
        assert runners[0].wait(10) == 75


def test_a_ring_that_never_forms_ends_within_its_timeout() -> None:
    # Rank 1 never starts: rank 0 waits in MLX's ring init until the watcher ends it.
    r = Runner()
    try:
        r.hello()
        rank = runner_pb2.Rank(rank=0, size=2, split=[1, 4], hosts=ring_hosts(2), ring_timeout_s=2)
        start = time.monotonic()
        end = r.load(model(), rank=rank)
        assert end.WhichOneof("msg") == "error", end
        assert end.error.reason == "load_stall"
        assert "the ring did not form within 2s" in end.error.message
        assert r.wait(5) == -signal.SIGKILL
        assert time.monotonic() - start < 10
        assert [p.phase for p in r.progress][-1] == "ring"
    finally:
        r.close()


def test_a_partial_directory_missing_a_tensor_is_weights_corrupt(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    split = [1, 4]
    path = partial(tmp_path, split, 1)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "mlx"})
    r = Runner()
    try:
        r.hello()
        rank = runner_pb2.Rank(rank=1, size=2, split=split, hosts=ring_hosts(2))
        end = r.load(path, rank=rank)
        assert end.error.reason == "weights_corrupt"
        assert "lacks the tensor model.layers.2.mlp.up_proj.weight" in end.error.message
        assert "\n" not in end.error.message
        assert r.wait(10) == 65
        assert "ring" not in [p.phase for p in r.progress]  # refused before waiting for peers
    finally:
        r.close()


def test_a_partial_directory_for_other_layers_is_weights_corrupt(tmp_path: Path) -> None:
    path = partial(tmp_path, [1, 4], 0)  # rank 0's part (layer 4) given to rank 1 (layers 0-3)
    r = Runner()
    try:
        r.hello()
        rank = runner_pb2.Rank(rank=1, size=2, split=[1, 4], hosts=ring_hosts(2))
        end = r.load(path, rank=rank)
        assert end.error.reason == "weights_corrupt"
        assert "lacks the tensor model.layers.0." in end.error.message
    finally:
        r.close()


def test_an_architecture_without_a_pipeline_is_model_unsupported() -> None:
    r = Runner()
    try:
        r.hello()
        rank = runner_pb2.Rank(rank=0, size=2, split=[1, 1], hosts=ring_hosts(2))
        end = r.load(models.demo_model("llama", num_layers=2, chat_template=False), rank=rank)
        assert end.error.reason == "model_unsupported"
        assert end.error.message.startswith("mlx-lm has no pipeline for llama")
        assert r.wait(10) == 65
    finally:
        r.close()


def test_a_split_that_does_not_cover_the_model_is_refused() -> None:
    r = Runner()
    try:
        r.hello()
        rank = runner_pb2.Rank(rank=0, size=2, split=[1, 1], hosts=ring_hosts(2))
        end = r.load(model(), rank=rank)
        assert end.error.reason == "internal"
        assert "covers 2 layers of 5" in end.error.message
        assert r.wait(10) == 70
    finally:
        r.close()


def test_a_tensor_of_the_wrong_shape_is_weights_corrupt() -> None:
    # The whole check is this rank's: load_model, told not to be strict (a partial directory
    # lacks the other ranks' layers), would take a wrong shape silently.
    r = Runner()
    try:
        r.hello()
        rank = runner_pb2.Rank(rank=1, size=2, split=[1, 1], hosts=ring_hosts(2))
        end = r.load(models.mismatched_shapes(), rank=rank)
        assert end.error.reason == "weights_corrupt"
        assert "mlp.gate_proj.weight has shape [128, 64], the model expects [96, 64]" in (
            end.error.message
        )
        assert r.wait(10) == 65
    finally:
        r.close()
