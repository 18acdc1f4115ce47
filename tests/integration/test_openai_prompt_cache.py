"""The next turn of a conversation over HTTP reuses the first turn's prompt cache, says so in
`usage.prompt_tokens_details.cached_tokens`, and gets the text it gets without any cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests import models
from tests.daemon import Daemon
from tests.httpapi import client, http_daemon

Messages = list[ChatCompletionMessageParam]

FIRST: Messages = [{"role": "user", "content": "Once upon a time there was a little computer."}]


def started(home: Path, **env: str) -> tuple[Daemon, int]:
    d, port = http_daemon(home, **env)
    d.start()
    d.ok("models", "add", "qwen", str(models.demo_model("qwen2")))
    return d, port


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(port of an exod with the prompt cache, port of one without it)."""
    cached, cached_port = started(tmp_path / "cached")
    uncached, uncached_port = started(tmp_path / "uncached", EXOD_PROMPT_CACHE_BYTES="0")
    try:
        yield cached_port, uncached_port
    finally:
        leaked = cached.cleanup() + uncached.cleanup()
        assert not leaked, "runners outlived exod"


def chat(port: int, messages: Messages, *, stream: bool) -> tuple[str, Any]:
    """(text, usage) of a chat completion, streamed or not."""
    api = client(port)
    if not stream:
        reply = api.chat.completions.create(
            model="qwen",
            messages=messages,
            max_tokens=24,
        )
        return reply.choices[0].message.content or "", reply.usage
    chunks = list(
        api.chat.completions.create(
            model="qwen",
            messages=messages,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_second_turn_reuses_the_first_and_its_text_is_unchanged(
    servers: tuple[int, int], stream: bool
) -> None:
    cached_port, uncached_port = servers
    answer, first = chat(cached_port, FIRST, stream=stream)
    assert first.prompt_tokens_details.cached_tokens == 0
    second: Messages = [
        *FIRST,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And then?"},
    ]
    text, usage = chat(cached_port, second, stream=stream)
    assert usage.prompt_tokens_details.cached_tokens >= first.prompt_tokens, usage
    assert usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens, usage

    # The same turn where nothing is cached: the same text, nothing reported cached.
    assert chat(uncached_port, FIRST, stream=stream)[0] == answer
    want, plain = chat(uncached_port, second, stream=stream)
    assert plain.prompt_tokens_details.cached_tokens == 0
    assert text == want
    assert usage.prompt_tokens == plain.prompt_tokens
