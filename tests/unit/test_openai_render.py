"""The shapes OpenAI's clients parse: completions, chunks, usage, models, events."""

from __future__ import annotations

import json

from exod.openai import render
from exod.openai.render import Reply
from exod.proto.exo.v1 import control_pb2

CHAT = Reply("chat", "run-1234abcd", 1700000000, "demo")
TEXT = Reply("completion", "run-1234abcd", 1700000000, "demo")
DONE = control_pb2.RunDone(
    prompt_tokens=11, generation_tokens=5, stop_reason="length", cached_tokens=8
)
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 5,
    "total_tokens": 16,
    "prompt_tokens_details": {"cached_tokens": 8},
}


def test_ids_carry_the_run_id() -> None:
    assert CHAT.id == "chatcmpl-run-1234abcd"
    assert TEXT.id == "cmpl-run-1234abcd"


def test_chat_completion() -> None:
    assert render.completion(CHAT, "Hello", DONE) == {
        "id": "chatcmpl-run-1234abcd",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "demo",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "length",
                "logprobs": None,
            }
        ],
        "usage": USAGE,
    }


def test_text_completion() -> None:
    body = render.completion(TEXT, "Hello", DONE)
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": "Hello", "finish_reason": "length", "logprobs": None}
    ]


def test_finish_reason() -> None:
    for stop_reason, want in [("length", "length"), ("stop", "stop"), ("", "stop")]:
        assert render.finish_reason(control_pb2.RunDone(stop_reason=stop_reason)) == want


def test_chat_chunks() -> None:
    first = render.chunk(CHAT, "", first=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    assert render.chunk(CHAT, "lo")["choices"][0]["delta"] == {"content": "lo"}
    last = render.chunk(CHAT, None, "stop")["choices"][0]
    assert (last["delta"], last["finish_reason"]) == ({}, "stop")


def test_text_chunks() -> None:
    assert render.chunk(TEXT, "lo")["choices"][0]["text"] == "lo"
    last = render.chunk(TEXT, None, "length")
    assert last["object"] == "text_completion"
    assert (last["choices"][0]["text"], last["choices"][0]["finish_reason"]) == ("", "length")


def test_usage_chunk_has_no_choices() -> None:
    chunk = render.usage_chunk(CHAT, DONE)
    assert chunk["choices"] == []
    assert chunk["usage"] == USAGE


def test_usage_says_zero_cached_tokens_without_a_cache_hit() -> None:
    done = control_pb2.RunDone(prompt_tokens=3, generation_tokens=2)
    assert render.usage(done)["prompt_tokens_details"] == {"cached_tokens": 0}


def test_models_are_sorted() -> None:
    assert render.models(["qwen", "demo"]) == {
        "object": "list",
        "data": [
            {"id": "demo", "object": "model", "created": 0, "owned_by": "exod"},
            {"id": "qwen", "object": "model", "created": 0, "owned_by": "exod"},
        ],
    }


def test_an_event_is_one_data_line_whatever_the_text() -> None:
    text = "line one\nline two\r\n\n😀 — data: [DONE]"  # non-ASCII on purpose
    event = render.event(render.chunk(CHAT, text))
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert event.count(b"\n") == 2
    assert b"\r" not in event
    assert json.loads(event[len(b"data: ") :])["choices"][0]["delta"]["content"] == text
    assert render.DONE_EVENT == b"data: [DONE]\n\n"
