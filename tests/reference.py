"""What mlx-lm itself generates for a model and a prompt: the text exoctl must print.

Computed in the test process with mlx_lm.load and mlx_lm.generate, never through exod, and cached
for the session (loading a tiny model and generating a few dozen tokens takes a fraction of a
second; the same case is asked for by many tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Expected:
    text: str  # what mlx_lm.generate returns
    generation_tokens: int  # how many tokens stream_generate produced for it
    finish_reason: str  # "length" or "stop"

    @property
    def stdout(self) -> bytes:
        """What `exoctl run` (without --json) writes for it: the text and one newline."""
        return self.text.encode() + b"\n"


@functools.cache
def _load(model: Path) -> tuple[Any, Any]:
    import mlx_lm  # MLX only for the tests that compare against it

    loaded = mlx_lm.load(str(model))
    return loaded[0], loaded[1]


@functools.cache
def expected(model: Path, prompt: str, max_tokens: int, *, chat: bool = False) -> Expected:
    """What mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=N) returns, with default
    (greedy) sampling.

    With chat=True the prompt is the chat template applied to one user message, as the issue
    states: tokenizer.apply_chat_template([{"role": "user", ...}], add_generation_prompt=True).
    """
    from mlx_lm.generate import stream_generate

    lm, tokenizer = _load(model)
    request: str | list[int] = prompt
    if chat:
        assert tokenizer.has_chat_template, f"{model} has no chat template"
        messages = [{"role": "user", "content": prompt}]
        request = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    # One pass: mlx_lm.generate is exactly this loop's text joined (mlx_lm/generate.py), and
    # the last response tells how many tokens and why it stopped.
    pieces, last = [], None
    for last in stream_generate(lm, tokenizer, request, max_tokens=max_tokens):
        pieces.append(last.text)
    assert last is not None
    return Expected(
        text="".join(pieces),
        generation_tokens=int(last.generation_tokens),
        finish_reason=str(last.finish_reason),
    )
