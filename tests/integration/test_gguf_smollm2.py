"""The real model: SmolLM2-135M-Instruct's Q4_1 GGUF, converted, is right and not only runnable.

Its perplexity on three fixed English sentences is low (about 10 here), where the same weights
with llama's query/key rows left as GGUF stores them score about 32; and asked "What is the capital
of France?" through its own chat template it answers Paris. Skips when the GGUF is not cached
(tests/smollm2.py says how to fetch it), fails then under EXOD_REQUIRE_SMOLLM2=1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from exod.models.gguf import convert as convert_module
from exod.models.gguf import tensors
from tests.smollm2 import smollm2_gguf

ROOT = Path(__file__).resolve().parents[2]

# Short, because MLX's CPU backend takes about 0.1 s per token here even in a forward pass.
PARAGRAPH = (
    "The city of Paris is the capital of France and its largest city. It lies on the river "
    "Seine, in the north of the country. For centuries it has been a centre of art, science and "
    "trade, and today millions of people visit it every year to see its museums, its churches and "
    "its famous tower."
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF converted by the subprocess exod runs for an import."""
    src = smollm2_gguf()
    dest = tmp_path_factory.mktemp("smollm2") / "smollm2"
    proc = subprocess.run(
        [sys.executable, "-m", "exod.models.gguf", str(src), str(dest)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "content_hash" in json.loads(proc.stdout.splitlines()[-1])
    return dest


@cache
def _load(path: Path) -> tuple[Any, Any]:
    import mlx_lm  # MLX only for the tests that run the model

    loaded: Any = mlx_lm.load(str(path))
    return loaded[0], loaded[1]


def perplexity(path: Path, text: str) -> float:
    import mlx.core as mx
    import mlx.nn as nn

    model, tokenizer = _load(path)
    ids = mx.array(tokenizer.encode(text))[None]
    logits = model(ids[:, :-1]).astype(mx.float32)
    loss = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="mean")
    value = loss.item()
    assert isinstance(value, float)
    return math.exp(value)


def test_answers_the_capital_of_france(converted: Path) -> None:
    import mlx_lm

    model, tokenizer = _load(converted)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n")  # the GGUF's own template, system prompt
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24, verbose=False)
    assert "Paris" in answer, answer


def test_perplexity_is_low_and_needs_the_rotary_layout(
    converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = perplexity(converted, PARAGRAPH)
    # The same weights with llama's q/k rows left in GGUF's order (the un-permutation skipped).
    plan = tensors.plan_tensors

    def left_permuted(*args: Any) -> Any:
        return [dataclasses.replace(p, unpermute_heads=0) for p in plan(*args)]

    monkeypatch.setattr(convert_module, "plan_tensors", left_permuted)
    convert_module.convert(smollm2_gguf(), tmp_path / "permuted")
    bad = perplexity(tmp_path / "permuted", PARAGRAPH)
    print(f"perplexity {good:.1f}; with q/k left permuted {bad:.1f}")
    assert good < 20
    assert bad > 2 * good
