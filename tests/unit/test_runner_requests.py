"""A request's bookkeeping in the runner: its text token by token, its stop sequences, its Done,
and its own sampler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from exod.proto.exo.v1 import runner_pb2
from exod.runners.requests import Request, make_sampler

EOS = 0


@dataclass
class FakeDetokenizer:
    """mlx-lm's streaming detokenizer, with one character per token: token n is chr(n)."""

    tokens: list[int] = field(default_factory=list)
    offset: int = 0
    finalized: bool = False

    def add_token(self, token: int) -> None:
        self.tokens.append(token)

    def finalize(self) -> None:
        self.finalized = True

    @property
    def last_segment(self) -> str:
        text = "".join(map(chr, self.tokens))
        segment, self.offset = text[self.offset :], len(text)
        return segment


def _run(
    tokens: str, finish: str, stop: list[str] | None = None, eos: bool = False, hold_s: float = 0
) -> tuple[Request, list[runner_pb2.FromRunner]]:
    """Feed a request its tokens, then end it as the batch loop does (flush, then Done)."""
    req = runner_pb2.Generate(request_id="r", prompt="p", max_tokens=len(tokens), stop=stop or [])
    request = Request(req, [1, 2, 3], FakeDetokenizer(), cached_tokens=2, hold_s=hold_s)
    sent: list[runner_pb2.FromRunner] = []
    ids = [ord(c) for c in tokens] + ([EOS] if eos else [])
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        request.add(token, finish if last else None, sent.append)
        if request.stops.stopped:
            break
    request.flush(sent.append)
    return request, sent


def _text(sent: list[runner_pb2.FromRunner]) -> str:
    return "".join(m.tokens.text for m in sent)


def test_every_token_is_counted_and_the_done_says_how_it_ended() -> None:
    request, sent = _run("hello", "length")
    assert _text(sent) == "hello"
    assert sum(m.tokens.count for m in sent) == 5
    done = request.done().done
    assert (done.request_id, done.stop_reason) == ("r", "length")
    assert (done.prompt_tokens, done.cached_tokens, done.generation_tokens) == (3, 2, 5)
    assert done.ttft_s > 0
    assert request.detokenizer.finalized


def test_the_end_of_sequence_token_counts_but_is_not_text() -> None:
    request, sent = _run("hi", "stop", eos=True)
    assert _text(sent) == "hi"
    assert request.detokenizer.tokens == [ord("h"), ord("i")]
    done = request.done().done
    assert (done.stop_reason, done.generation_tokens) == ("stop", 3)


def test_a_stop_sequence_across_tokens_ends_it_and_is_never_shown() -> None:
    request, sent = _run("ab<END>cd", "length", stop=["<END>"])
    assert _text(sent) == "ab"
    assert request.stops.stopped
    assert request.done().done.stop_reason == "stop"
    assert request.generation_tokens == len("ab<END>")


def test_text_held_for_a_stop_sequence_that_never_comes_is_sent_at_the_end() -> None:
    request, sent = _run("ab<EN", "length", stop=["<END>"])
    assert _text(sent) == "ab<EN"
    assert sum(m.tokens.count for m in sent) == 5
    assert request.done().done.stop_reason == "length"


def test_a_cancel_overrides_the_reason() -> None:
    request, _ = _run("abc", "length")
    assert request.done("cancelled").done.stop_reason == "cancelled"


def test_without_a_hold_each_token_is_a_frame_of_its_own() -> None:
    _, sent = _run("hello", "length")
    assert [(m.tokens.text, m.tokens.count) for m in sent] == [(c, 1) for c in "hello"]


def test_text_within_the_interval_is_held_for_one_frame_but_the_first_goes_at_once() -> None:
    request, sent = _run("hello world", "length", hold_s=3600)
    assert [(m.tokens.text, m.tokens.count) for m in sent] == [("h", 1), ("ello world", 10)]
    assert request.done().done.generation_tokens == 11


def test_held_text_goes_with_the_next_token_once_the_interval_has_passed() -> None:
    req = runner_pb2.Generate(request_id="r", prompt="p", max_tokens=9)
    request = Request(req, [1], FakeDetokenizer(), hold_s=0.05)
    sent: list[runner_pb2.FromRunner] = []
    for c in "abc":
        request.add(ord(c), None, sent.append)
    time.sleep(0.06)
    request.add(ord("d"), None, sent.append)
    assert [(m.tokens.text, m.tokens.count) for m in sent] == [("a", 1), ("bcd", 3)]


def test_holding_changes_how_text_is_cut_never_the_text() -> None:
    for args in [("hello", "length"), ("ab<END>cd", "length"), ("ab<EN", "length"), ("hi", "stop")]:
        stop = ["<END>"]
        _, one_by_one = _run(*args, stop=stop, eos=args[1] == "stop")
        request, held = _run(*args, stop=stop, eos=args[1] == "stop", hold_s=3600)
        assert _text(held) == _text(one_by_one)
        # The last frame also counts the tokens that made no text (a stop sequence, the end).
        assert sum(m.tokens.count for m in held) == request.generation_tokens


def test_greedy_requests_share_one_sampler_so_a_batch_samples_in_one_call() -> None:
    a = make_sampler(runner_pb2.Generate(temperature=0))
    b = make_sampler(runner_pb2.Generate(temperature=0))
    assert a is b


def test_a_seeded_sampler_has_its_own_key_untouched_by_the_global_one() -> None:
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    logprobs = mx.log(mx.softmax(mx.random.normal((1, 64)), axis=-1))
    req = runner_pb2.Generate(temperature=1.3, has_seed=True, seed=42)

    def draws(seeded: bool) -> list[int]:
        sampler = make_sampler(req) if seeded else mlx_make_sampler(temp=1.3)
        out = []
        for i in range(30):
            if seeded:
                mx.random.seed(i)  # anyone else reseeding the global state changes nothing
            token: Any = sampler(logprobs).item()
            out.append(int(token))
        return out

    first, second = draws(True), draws(True)
    assert first == second
    mx.random.seed(42)
    assert first == draws(False)  # and it is what mlx-lm draws after mx.random.seed(seed)
    assert len(set(first)) > 1
