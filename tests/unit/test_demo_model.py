"""The demo model: written locally, deterministic, atomic, and a real model for mlx-lm."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import exod.models.demo as demo
from exod.models.demo import Arch, write_demo_model
from exod.models.tokens import count_prompt_tokens
from tests import models

PROMPTS = ["Hello, how are you?", "Grüße aus 東京 🦊 — ça va?", "", "   ", "<|im_start|>user"]


@cache
def _mlx_load(path: Path) -> tuple[Any, Any]:
    import mlx_lm  # MLX only for the tests that compare with it

    loaded = mlx_lm.load(str(path))  # (model, tokenizer), typed as maybe with a config too
    return loaded[0], loaded[1]


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_demo_model(tmp_path / "a", seed=7)
    b = write_demo_model(tmp_path / "b", seed=7)
    assert _files(a) == _files(b)
    assert set(_files(a)) == {
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_other_seed_other_weights_same_tokenizer(tmp_path: Path) -> None:
    a = _files(write_demo_model(tmp_path / "a", seed=1))
    b = _files(write_demo_model(tmp_path / "b", seed=2))
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] == b["tokenizer.json"]


def test_written_quickly(tmp_path: Path) -> None:
    start = time.monotonic()
    write_demo_model(tmp_path / "m")
    assert time.monotonic() - start < 2.0


def test_readme_says_the_weights_are_random() -> None:
    readme = (models.demo_model() / "README.md").read_text()
    assert "random weights" in readme
    assert "gibberish" in readme


def test_existing_destination_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_demo_model(dest)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def test_a_failed_write_leaves_no_model_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []

    def fail_on_third(path: Path, data: bytes) -> None:
        written.append(path.name)
        if len(written) == 3:
            raise OSError("disk full")
        path.write_bytes(data)

    monkeypatch.setattr(demo, "_write_durably", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        write_demo_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_vocabulary_larger_than_the_corpus_allows_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        write_demo_model(tmp_path / "m", vocab_size=50_000)
    assert not (tmp_path / "m").exists()


def test_config_matches_the_tokenizer() -> None:
    path = models.demo_model()
    config = json.loads((path / "config.json").read_text())
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"] | {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert config["vocab_size"] == len(vocab) == 512
    assert vocab["<|im_end|>"] == config["eos_token_id"]
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(vocab)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_mlx_lm_loads_it_and_greedy_decoding_goes_on(arch: Arch) -> None:
    from mlx_lm import stream_generate  # MLX only where it is compared with

    model, tokenizer = _mlx_load(models.demo_model(arch))
    assert model.model_type == arch
    responses = list(stream_generate(model, tokenizer, PROMPTS[0], max_tokens=40))
    assert responses[-1].generation_tokens >= 20
    assert "".join(r.text for r in responses).strip()


def test_chat_template_is_chatml() -> None:
    _, tokenizer = _mlx_load(models.demo_model())
    assert tokenizer.has_chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_no_chat_template_when_asked() -> None:
    _, tokenizer = _mlx_load(models.demo_model(chat_template=False))
    assert not tokenizer.has_chat_template


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_tokens_are_counted_as_mlx_lm_encodes(arch: Arch, prompt: str) -> None:
    path = models.demo_model(arch)
    _, tokenizer = _mlx_load(path)
    assert count_prompt_tokens(path, prompt) == len(tokenizer.encode(prompt))


def test_no_tokenizer_json_no_count() -> None:
    path = models.copy_model()
    (path / "tokenizer.json").unlink()
    assert count_prompt_tokens(path, "hello") is None


def test_a_replaced_tokenizer_is_counted_afresh() -> None:
    path = models.copy_model()
    prompt = "The quick brown fox jumps over the lazy dog."
    before = count_prompt_tokens(path, prompt)
    smaller = models.demo_model(vocab_size=300)  # fewer merges: more tokens for the same text
    (path / "tokenizer.json").write_bytes((smaller / "tokenizer.json").read_bytes())
    after = count_prompt_tokens(path, prompt)
    assert before is not None and after is not None
    assert after > before
