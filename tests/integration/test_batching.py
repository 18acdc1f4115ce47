"""Many requests at once in one real runner subprocess: continuous batching and the prompt cache.

The test plays the daemon over the runner pipe (tests/runner_pipe.py) and compares each request's
text with mlx_lm.generate of the same prompt run alone in this process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exod.models.demo import Arch
from exod.proto.exo.v1 import runner_pb2
from tests import models
from tests.runner_pipe import Outcome, Runner, request_id

PROMPTS = [
    "Once upon a time",
    "Hello",
    "The quick brown fox jumps over the lazy dog and then",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "Grüße aus München — 東京 🦊 ça va?",
    "x",
    "In the beginning there was nothing but the sea, and the sea was",
    "What is the meaning",
]
LONG_DECODE = 100_000  # tokens; far more than a test waits for, so only Cancel ends it
CACHE_BYTES = 64 << 20


def _model(arch: Arch) -> Path:
    # llama is made without a chat template: its requests show the raw fallback.
    if arch == "qwen2":
        return models.demo_model("qwen2", num_layers=3)
    return models.demo_model("llama", num_layers=2, chat_template=False)


def _start(path: Path, **options: int) -> Runner:
    r = Runner()
    r.hello()
    end = r.load(path, **options)
    assert end.WhichOneof("msg") == "ready", end
    return r


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def batched(request: pytest.FixtureRequest) -> Iterator[tuple[Runner, Path]]:
    """A runner that runs 8 at once, with no prompt cache (each text is computed afresh)."""
    path = _model(request.param)
    r = _start(path, parallel=8, mlx_cache_limit=32 << 20)
    yield r, path
    r.close()


def _reference(path: Path, prompt: str | list[int], max_tokens: int, **kwargs: Any) -> str:
    import mlx_lm

    from tests.reference import _load

    model, tokenizer = _load(path)
    return str(mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs))


def _chat_ids(path: Path, messages: list[dict[str, str]]) -> list[int]:
    from tests.reference import _load

    _, tokenizer = _load(path)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def _requests(n: int = 8, **extra: Any) -> list[runner_pb2.Generate]:
    """n requests of different prompts and lengths, alternately raw and through the template."""
    return [
        runner_pb2.Generate(
            request_id=f"r{i}",
            prompt=PROMPTS[i % len(PROMPTS)],
            raw=i % 2 == 0,
            max_tokens=20 + 7 * i,
            **extra,
        )
        for i in range(n)
    ]


def _expected(path: Path, req: runner_pb2.Generate) -> str:
    from tests.reference import _load

    _, tokenizer = _load(path)
    prompt: str | list[int] = req.prompt
    if not req.raw and tokenizer.has_chat_template:
        prompt = _chat_ids(path, [{"role": "user", "content": req.prompt}])
    return _reference(path, prompt, req.max_tokens)


def _send_all(r: Runner, requests: list[runner_pb2.Generate]) -> None:
    for req in requests:
        r.send(generate=req)


def _first(log: list[runner_pb2.FromRunner], which: str, rid: str | None = None) -> int:
    return next(
        i
        for i, m in enumerate(log)
        if m.WhichOneof("msg") == which and (rid is None or request_id(m) == rid)
    )


def test_eight_concurrent_greedy_requests_each_get_their_text_alone(
    batched: tuple[Runner, Path],
) -> None:
    r, path = batched
    requests = _requests()
    _send_all(r, requests)
    log: list[runner_pb2.FromRunner] = []
    outcomes = r.collect([q.request_id for q in requests], log=log)
    for req in requests:
        outcome = outcomes[req.request_id]
        assert outcome.text == _expected(path, req), req.request_id
        assert outcome.done.stop_reason in {"length", "stop"}
        assert outcome.done.cached_tokens == 0
    # They ran together: every request had streamed text before the first one ended.
    first_done = _first(log, "done")
    started = {request_id(m) for m in log[:first_done] if m.WhichOneof("msg") == "tokens"}
    assert len(started) == len(requests)


def test_stop_sequences_end_their_own_requests_only(batched: tuple[Runner, Path]) -> None:
    r, path = batched
    requests = _requests(6)
    cuts = {}
    for req in requests[::2]:  # a stop sequence from the middle of what it would say
        text = _expected(path, req)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        req.stop.append(stop)
        cuts[req.request_id] = text[: text.index(stop)]
    _send_all(r, requests)
    outcomes = r.collect([q.request_id for q in requests])
    for req in requests:
        outcome = outcomes[req.request_id]
        if req.request_id in cuts:
            assert outcome.text == cuts[req.request_id]
            assert outcome.done.stop_reason == "stop"
        else:
            assert outcome.text == _expected(path, req)


def test_a_seeded_request_gets_the_same_text_beside_seven_sampled_ones(
    batched: tuple[Runner, Path],
) -> None:
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    r, path = batched
    seeded = runner_pb2.Generate(
        request_id="seeded",
        prompt="Once upon a time",
        raw=True,
        max_tokens=40,
        temperature=1.5,
        has_seed=True,
        seed=1234,
    )
    alone, _ = r.generate(**_fields(seeded))
    others = _requests(7, temperature=1.2)
    for i, other in enumerate(others):
        if i % 2:  # half of them seeded too, with seeds of their own
            other.has_seed, other.seed = True, 99 + i
    _send_all(r, [*others[:3], seeded, *others[3:]])
    outcomes = r.collect(["seeded", *(q.request_id for q in others)])
    assert outcomes["seeded"].text == alone
    mx.random.seed(1234)
    assert alone == _reference(path, "Once upon a time", 40, sampler=make_sampler(temp=1.5))


def _fields(req: runner_pb2.Generate) -> dict[str, Any]:
    return {f.name: v for f, v in req.ListFields()}


def test_cancelled_and_refused_requests_leave_the_others_exact(
    batched: tuple[Runner, Path],
) -> None:
    r, path = batched
    requests = _requests(6)
    long = runner_pb2.Generate(request_id="long", prompt="Hi", raw=True, max_tokens=LONG_DECODE)
    refused = runner_pb2.Generate(
        request_id="refused", prompt=PROMPTS[2], raw=True, max_tokens=10, max_prompt_tokens=3
    )
    _send_all(r, [*requests[:3], long, refused, *requests[3:]])
    ids = [q.request_id for q in requests]
    outcomes: dict[str, Outcome] = {rid: Outcome() for rid in [*ids, "long", "refused"]}
    cancelled = False
    while not all(
        o.messages and o.end.WhichOneof("msg") in {"done", "error"} for o in outcomes.values()
    ):
        msg = r.recv(60)
        outcomes[request_id(msg)].messages.append(msg)
        if not cancelled and request_id(msg) == "long" and msg.WhichOneof("msg") == "tokens":
            r.send(cancel=runner_pb2.Cancel(request_id="long"))
            cancelled = True
    assert outcomes["refused"].end.error.reason == "prompt_too_long"
    assert [m.WhichOneof("msg") for m in outcomes["refused"].messages] == ["error"]
    assert outcomes["long"].done.stop_reason == "cancelled"
    assert 0 < outcomes["long"].done.generation_tokens < LONG_DECODE
    for req in requests:
        assert outcomes[req.request_id].text == _expected(path, req), req.request_id


def test_no_more_than_parallel_run_at_once_the_rest_wait_in_order() -> None:
    path = _model("qwen2")
    r = _start(path, parallel=2)
    try:
        requests = _requests(4)
        _send_all(r, requests)
        log: list[runner_pb2.FromRunner] = []
        outcomes = r.collect([q.request_id for q in requests], log=log)
        for req in requests:
            assert outcomes[req.request_id].text == _expected(path, req)
        # r2 starts only when r0 (the shortest of the first two) has ended, r3 after r1.
        assert _first(log, "done", "r0") < _first(log, "progress", "r2")
        assert _first(log, "done", "r1") < _first(log, "progress", "r3")
        assert all(h.active <= 2 for h in r.heartbeats)
    finally:
        r.close()


def test_a_waiting_request_can_be_cancelled_before_it_starts() -> None:
    r = _start(_model("qwen2"), parallel=1)
    try:
        long = runner_pb2.Generate(request_id="long", prompt="Hi", raw=True, max_tokens=LONG_DECODE)
        waiting = runner_pb2.Generate(request_id="waiting", prompt="Hello", raw=True, max_tokens=5)
        _send_all(r, [long, waiting])
        r.send(cancel=runner_pb2.Cancel(request_id="waiting"))
        while True:  # the long one is decoding, the other is waiting behind it
            msg = r.recv()
            if request_id(msg) == "waiting":
                break
        assert msg.WhichOneof("msg") == "done", msg
        assert msg.done.stop_reason == "cancelled"
        assert msg.done.generation_tokens == 0
        r.send(cancel=runner_pb2.Cancel(request_id="long"))
        assert r.collect(["long"])["long"].done.stop_reason == "cancelled"
    finally:
        r.close()


def test_a_cancel_that_overtakes_its_request_cancels_it_on_arrival() -> None:
    r = _start(_model("qwen2"))
    try:
        r.send(cancel=runner_pb2.Cancel(request_id="early"))
        _, msgs = r.generate(request_id="early", prompt="Hello", raw=True)
        assert [m.WhichOneof("msg") for m in msgs] == ["done"]
        assert msgs[0].done.stop_reason == "cancelled"
    finally:
        r.close()


@pytest.fixture(scope="module")
def cached() -> Iterator[tuple[Runner, Path]]:
    path = _model("qwen2")
    r = _start(path, parallel=4, prompt_cache_bytes=CACHE_BYTES)
    yield r, path
    r.close()


def test_a_second_turn_reuses_the_first_turns_prompt_and_answer(
    cached: tuple[Runner, Path],
) -> None:
    r, path = cached
    first = [{"role": "user", "content": "Tell me a story about a fox."}]
    conversation = [runner_pb2.ChatMessage(**m) for m in first]
    answer, msgs = r.generate(request_id="t1", messages=conversation, max_tokens=30)
    turn1 = msgs[-1].done
    assert turn1.cached_tokens == 0

    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "More"}]
    conversation = [runner_pb2.ChatMessage(**m) for m in second]
    text, msgs = r.generate(request_id="t2", messages=conversation, max_tokens=30)
    turn2 = msgs[-1].done
    assert turn2.cached_tokens >= turn1.prompt_tokens
    assert turn2.cached_tokens < turn2.prompt_tokens
    assert text == _reference(path, _chat_ids(path, second), 30)
    prefill = [m.progress for m in msgs if m.WhichOneof("msg") == "progress"]
    assert prefill[0].current > turn2.cached_tokens  # the cached part is not prefilled again
    assert prefill[-1].current == prefill[-1].total == turn2.prompt_tokens


def test_the_same_prompt_again_prefills_only_its_last_token(cached: tuple[Runner, Path]) -> None:
    r, path = cached
    prompt = "The same prompt, sent twice, " * 3
    first, msgs = r.generate(request_id="a", prompt=prompt, raw=True, max_tokens=12)
    again, msgs = r.generate(request_id="b", prompt=prompt, raw=True, max_tokens=12)
    done = msgs[-1].done
    assert done.cached_tokens == done.prompt_tokens - 1
    assert first == again == _reference(path, prompt, 12)
    beat = r.heartbeat()
    assert 0 < beat.prompt_cache_bytes <= CACHE_BYTES
    assert beat.cached_prompt_tokens >= done.cached_tokens
    assert beat.prompt_tokens >= 2 * done.prompt_tokens
    assert beat.active == 0


def test_a_cache_bound_too_small_for_anything_keeps_nothing() -> None:
    r = _start(_model("qwen2"), prompt_cache_bytes=1000)
    try:
        for rid in ("a", "b"):
            _, msgs = r.generate(request_id=rid, prompt="Hello there", raw=True, max_tokens=8)
            assert msgs[-1].done.cached_tokens == 0
    finally:
        r.close()


def test_a_request_cancelled_while_prefilling_leaves_the_decoding_one_exact() -> None:
    # A context long enough for a prompt of three prefill chunks (2048 tokens each).
    path = models.demo_model("qwen2", num_layers=3, max_position_embeddings=8192)
    r = _start(path, parallel=2)
    try:
        short = runner_pb2.Generate(request_id="short", prompt="Hello", raw=True, max_tokens=60)
        long = runner_pb2.Generate(request_id="long", prompt="word " * 2500, raw=True, max_tokens=5)
        _send_all(r, [short, long])
        outcomes: dict[str, Outcome] = {"short": Outcome(), "long": Outcome()}
        while not all(o.messages and o.end.WhichOneof("msg") == "done" for o in outcomes.values()):
            msg = r.recv(60)
            outcomes[request_id(msg)].messages.append(msg)
            if msg.WhichOneof("msg") == "progress" and msg.progress.request_id == "long":
                assert msg.progress.current < msg.progress.total, "prefilled before the cancel"
                r.send(cancel=runner_pb2.Cancel(request_id="long"))
        assert outcomes["long"].done.stop_reason == "cancelled"
        assert outcomes["long"].done.generation_tokens == 0
        assert outcomes["short"].text == _reference(path, "Hello", 60)
    finally:
        r.close()
