"""What the HTTP API sends back: completions, stream chunks, server-sent events (pure).

The shapes are OpenAI's, so that its clients parse them: `chat.completion` and
`chat.completion.chunk` for chat, `text_completion` for completions, `list` of `model` for the
models. A response's id ends with the run id, which names the run in `exoctl events`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from exod.openai.schema import Kind
from exod.proto.exo.v1 import control_pb2

DONE_EVENT = b"data: [DONE]\n\n"
OWNER = "exod"


@dataclass(frozen=True)
class Reply:
    """What every body of one response shares."""

    kind: Kind
    run_id: str
    created: int
    model: str

    @property
    def id(self) -> str:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        return f"{prefix}-{self.run_id}"

    def head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}


def finish_reason(done: control_pb2.RunDone) -> str:
    """OpenAI's finish_reason: the token limit, or anything else that ended it naturally (an
    end-of-sequence token, a stop sequence)."""
    return "length" if done.stop_reason == "length" else "stop"


def usage(done: control_pb2.RunDone) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens` are the prompt tokens reused from the prompt cache (they
    count in `prompt_tokens` too, as in OpenAI's own answers)."""
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.generation_tokens,
        "total_tokens": done.prompt_tokens + done.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def completion(reply: Reply, text: str, done: control_pb2.RunDone) -> dict[str, Any]:
    """The whole answer, for a request without `stream`."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(done), "logprobs": None}
    if reply.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
        body = reply.head("chat.completion")
    else:
        choice["text"] = text
        body = reply.head("text_completion")
    return {**body, "choices": [choice], "usage": usage(done)}


def chunk(
    reply: Reply, text: str | None, finish: str | None = None, *, first: bool = False
) -> dict[str, Any]:
    """One piece of a streamed answer; the last one has no text and a finish_reason."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if reply.kind == "chat":
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
        return {**reply.head("chat.completion.chunk"), "choices": [choice]}
    choice["text"] = text or ""
    return {**reply.head("text_completion"), "choices": [choice]}


def usage_chunk(reply: Reply, done: control_pb2.RunDone) -> dict[str, Any]:
    """The extra last chunk a client asks for with stream_options.include_usage."""
    object_ = "chat.completion.chunk" if reply.kind == "chat" else "text_completion"
    return {**reply.head(object_), "choices": [], "usage": usage(done)}


def models(names: Iterable[str]) -> dict[str, Any]:
    return {"object": "list", "data": [model(name) for name in sorted(names)]}


def model(name: str) -> dict[str, Any]:
    # The registry does not keep when a model was added; 0 says "unknown" in the one integer
    # OpenAI's schema has for it.
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


def event(obj: dict[str, Any]) -> bytes:
    """One server-sent event; compact JSON on one line, so no line of it can end the event."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
