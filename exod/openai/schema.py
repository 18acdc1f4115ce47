"""OpenAI request bodies, checked field by field and turned into a RunRequest (pure).

Every field we honour is checked for its type and range and refused with 400 naming it (the
`param` of the error). A feature we do not have (tools, several choices, log probabilities, JSON
mode, echo) is refused rather than ignored, since ignoring it would answer another question.
Sampling hints we cannot honour yet (top_p, penalties) and fields that change nothing here (user,
metadata) are accepted and ignored, as other OpenAI-compatible servers do, so that common clients
work unchanged. docs/openai.md lists each.

Defaults follow `exoctl run`, not OpenAI: temperature 0 (greedy, repeatable) and a bounded
max_tokens, so that a client that sends neither still gets the answer the CLI would give.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from exod.openai.errors import HttpError
from exod.proto.exo.v1 import control_pb2, runner_pb2

Kind = Literal["chat", "completion"]

# OpenAI's own default is "until the context is full"; a bound keeps a client that forgot to set
# one from holding a runner for minutes.
DEFAULT_MAX_TOKENS = 4096
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_STOPS = 16
MAX_STOP_CHARS = 256  # the runner holds back up to this much text while a stop may be forming
# OpenAI's newer name for the system role.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Present and not one of these values, the field asks for something exod does not do.
UNSUPPORTED: dict[Kind, dict[str, tuple[object, ...]]] = {
    "chat": {
        "n": (1,),
        "logprobs": (False,),
        "top_logprobs": (0,),
        "tools": ([],),
        "functions": ([],),
        "tool_choice": ("none",),
        "function_call": ("none",),
        "audio": (),
        "modalities": (["text"],),
        "prediction": (),
        "response_format": ({"type": "text"},),
    },
    "completion": {
        "n": (1,),
        "best_of": (1,),
        "logprobs": (0,),
        "echo": (False,),
        "suffix": ("",),
    },
}


@dataclass(frozen=True)
class Parsed:
    kind: Kind
    request: control_pb2.RunRequest
    stream: bool
    include_usage: bool


def chat_request(body: object) -> Parsed:
    """POST /v1/chat/completions: a conversation, rendered with the model's chat template."""
    fields = _object(body)
    request = _common(fields, "chat")
    request.messages.extend(_messages(fields.get("messages")))
    return _parsed(fields, "chat", request)


def completion_request(body: object) -> Parsed:
    """POST /v1/completions: a prompt continued as it is (`exoctl run --raw`)."""
    fields = _object(body)
    request = _common(fields, "completion")
    request.prompt = _prompt(fields.get("prompt"))
    request.raw = True
    return _parsed(fields, "completion", request)


def require_registered(model: str, registered: Collection[str]) -> None:
    """The `model` of a request names a registered model: never a path or an hf: id, which
    would let an HTTP client make exod read any directory it can."""
    if model not in registered:
        raise HttpError(
            404,
            "model_not_found",
            f"no registered model named {model!r}: GET /v1/models lists them; register one "
            "with `exoctl models add NAME DIR`",
            param="model",
        )


# --- the fields every request has -----------------------------------------------------------


def _common(fields: Mapping[str, object], kind: Kind) -> control_pb2.RunRequest:
    for name, allowed in UNSUPPORTED[kind].items():
        value = fields.get(name)
        if value is not None and value not in allowed:
            raise HttpError.bad_request(f"{name} is not supported by exod", name)
    model = _string(fields, "model")
    if not model:
        raise HttpError.bad_request("model is required: a name from GET /v1/models", "model")
    request = control_pb2.RunRequest(model=model)
    # max_completion_tokens is the newer name; it wins when a client sends both.
    limit = _integer(fields, "max_completion_tokens", 1, MAX_INT32)
    if limit is None:
        limit = _integer(fields, "max_tokens", 1, MAX_INT32)
    request.max_tokens = DEFAULT_MAX_TOKENS if limit is None else limit
    temperature = _number(fields, "temperature", 0.0, MAX_TEMPERATURE)
    request.temperature = 0.0 if temperature is None else temperature
    seed = _integer(fields, "seed", 0, MAX_SEED)
    if seed is not None:
        request.has_seed = True
        request.seed = seed
    request.stop.extend(_stops(fields.get("stop")))
    return request


def _parsed(fields: Mapping[str, object], kind: Kind, request: control_pb2.RunRequest) -> Parsed:
    stream = _boolean(fields, "stream") or False
    include_usage = False
    options = fields.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise HttpError.bad_request("stream_options must be an object", "stream_options")
        include_usage = _boolean(options, "include_usage", "stream_options.") or False
    return Parsed(kind, request, stream, include_usage)


def _stops(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise HttpError.bad_request("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise HttpError.bad_request(f"stop takes at most {MAX_STOPS} sequences", "stop")
    for stop in stops:
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise HttpError.bad_request(
                f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters", "stop"
            )
    return list(stops)


# --- chat and completion ----------------------------------------------------------------------


def _messages(value: object) -> list[runner_pb2.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise HttpError.bad_request("messages must be a non-empty list", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise HttpError.bad_request(f"{where} must be an object", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise HttpError.bad_request(
                f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role"
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise HttpError.bad_request("tool calls are not supported by exod", where)
        content = _content(message.get("content"), f"{where}.content")
        messages.append(runner_pb2.ChatMessage(role=ROLES[role], content=content))
    return messages


def _content(value: object, where: str) -> str:
    """A message's text: a string, or a list of text parts (what newer clients send)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise HttpError.bad_request(
                    "only text content is supported by exod", f"{where}[{i}]"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise HttpError.bad_request("a text part needs a string text", f"{where}[{i}].text")
            texts.append(text)
        return "".join(texts)
    raise HttpError.bad_request("content must be a string or a list of text parts", where)


def _prompt(value: object) -> str:
    # A list holding one prompt is what some clients send for a single prompt.
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        raise HttpError.bad_request(
            "prompt must be one string: exod completes one prompt per request (token lists "
            "are not supported)",
            "prompt",
        )
    raise HttpError.bad_request("prompt must be a string", "prompt")


# --- typed fields -----------------------------------------------------------------------------


def _object(body: object) -> Mapping[str, object]:
    if not isinstance(body, dict):
        raise HttpError.bad_request("the request body must be a JSON object")
    return body


def _string(fields: Mapping[str, object], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise HttpError.bad_request(f"{name} must be a string", name)
    return value


def _boolean(fields: Mapping[str, object], name: str, prefix: str = "") -> bool | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise HttpError.bad_request(f"{prefix}{name} must be true or false", prefix + name)
    return value


def _integer(fields: Mapping[str, object], name: str, low: int, high: int) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    # bool is an int in Python, and 5.0 is not an integer in OpenAI's schema either.
    if not isinstance(value, int) or isinstance(value, bool):
        raise HttpError.bad_request(f"{name} must be an integer", name)
    if not low <= value <= high:
        raise HttpError.bad_request(f"{name} must be from {low} to {high}, not {value}", name)
    return value


def _number(fields: Mapping[str, object], name: str, low: float, high: float) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise HttpError.bad_request(f"{name} must be a number", name)
    number = float(value)
    # Python's json reads NaN and Infinity; neither is in range.
    if not math.isfinite(number) or not low <= number <= high:
        raise HttpError.bad_request(f"{name} must be from {low:g} to {high:g}, not {value}", name)
    return number
