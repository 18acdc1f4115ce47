"""Request bodies of the OpenAI API: what is taken, what becomes the RunRequest, and what is
refused with 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from exod.openai import schema
from exod.openai.errors import HttpError
from exod.openai.schema import chat_request, completion_request, require_registered

CHAT: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION: dict[str, Any] = {"model": "demo", "prompt": "Once upon a time"}


def refused(parse: Any, body: object) -> HttpError:
    with pytest.raises(HttpError) as err:
        parse(body)
    assert err.value.status == 400
    return err.value


# --- what is taken ----------------------------------------------------------------------------


def test_chat_becomes_a_conversation() -> None:
    body = {
        **CHAT,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {
                "role": "developer",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
    }
    parsed = chat_request(body)
    assert parsed.kind == "chat"
    assert [(m.role, m.content) for m in parsed.request.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("system", "ab"),  # developer is OpenAI's newer name for system; parts are joined
    ]
    assert parsed.request.prompt == ""
    assert not parsed.request.raw


def test_completion_is_a_raw_prompt() -> None:
    parsed = completion_request(COMPLETION)
    assert parsed.kind == "completion"
    assert parsed.request.prompt == "Once upon a time"
    assert parsed.request.raw
    assert not parsed.request.messages
    assert completion_request({**COMPLETION, "prompt": ["one"]}).request.prompt == "one"


def test_defaults_are_the_clis() -> None:
    for parsed in (chat_request(CHAT), completion_request(COMPLETION)):
        r = parsed.request
        assert r.model == "demo"
        assert r.max_tokens == schema.DEFAULT_MAX_TOKENS
        assert r.temperature == 0.0
        assert not r.has_seed
        assert list(r.stop) == []
        assert not parsed.stream
        assert not parsed.include_usage


def test_sampling_limits_and_streaming_are_taken() -> None:
    parsed = chat_request(
        {
            **CHAT,
            "max_tokens": 7,
            "temperature": 0.5,
            "seed": 42,
            "stop": ["\n", "END"],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    r = parsed.request
    assert (r.max_tokens, r.temperature, r.has_seed, r.seed) == (7, 0.5, True, 42)
    assert list(r.stop) == ["\n", "END"]
    assert parsed.stream and parsed.include_usage
    assert list(completion_request({**COMPLETION, "stop": "x"}).request.stop) == ["x"]
    assert completion_request({**COMPLETION, "temperature": 1}).request.temperature == 1.0
    assert chat_request({**CHAT, "seed": 0}).request.has_seed


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    body = {**CHAT, "max_tokens": 5, "max_completion_tokens": 9}
    assert chat_request(body).request.max_tokens == 9


def test_null_is_absent() -> None:
    nulls = {k: None for k in ("max_tokens", "temperature", "seed", "stop", "stream", "n")}
    parsed = chat_request({**CHAT, **nulls, "stream_options": None})
    assert parsed.request.max_tokens == schema.DEFAULT_MAX_TOKENS
    assert not parsed.stream


def test_hints_we_cannot_honour_and_unknown_fields_are_ignored() -> None:
    body = {**CHAT, "top_p": 0.9, "presence_penalty": 1, "user": "u", "whatever": [1]}
    assert chat_request(body).request.messages[0].content == "Hi"


def test_features_asked_for_with_their_default_value_are_fine() -> None:
    chat_request(
        {**CHAT, "n": 1, "logprobs": False, "tools": [], "response_format": {"type": "text"}}
    )
    completion_request({**COMPLETION, "n": 1, "echo": False, "best_of": 1, "suffix": ""})


# --- what is refused --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"model": ""}, "model"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": False}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": "x" * (schema.MAX_STOP_CHARS + 1)}, "stop"),
        ({"stop": ["s"] * (schema.MAX_STOPS + 1)}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream_options": []}, "stream_options"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"n": 2}, "n"),
    ],
)
def test_a_field_of_the_wrong_type_or_range_is_refused_by_name(
    change: dict[str, Any], param: str
) -> None:
    for parse, base in ((chat_request, CHAT), (completion_request, COMPLETION)):
        body = {**base, **change}
        if change.get("model", "") is None:
            del body["model"]
        assert refused(parse, body).param == param


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": ["Hi"]}, "messages[0]"),
        ({"messages": [{"content": "Hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]},
            "messages[0]",
        ),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_chat_refusals(change: dict[str, Any], param: str) -> None:
    assert refused(chat_request, {**CHAT, **change}).param == param


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 2}, "logprobs"),
    ],
)
def test_completion_refusals(change: dict[str, Any], param: str) -> None:
    assert refused(completion_request, {**COMPLETION, **change}).param == param


@pytest.mark.parametrize("body", [[], "text", 5, None, [CHAT]])
def test_a_body_that_is_not_an_object_is_refused(body: object) -> None:
    for parse in (chat_request, completion_request):
        err = refused(parse, body)
        assert err.code == "invalid_argument"
        assert "JSON object" in err.message


def test_an_unregistered_model_is_not_found_even_as_a_path() -> None:
    require_registered("demo", {"demo", "qwen"})
    for name in ("nope", "/tmp/models/qwen", "hf:org/name", "Demo"):
        with pytest.raises(HttpError) as err:
            require_registered(name, {"demo"})
        assert (err.value.status, err.value.code, err.value.param) == (
            404,
            "model_not_found",
            "model",
        )
