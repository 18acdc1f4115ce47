"""A converted GGUF generates what the same weights generate as safetensors (mlx-lm, greedy).

The reference directory holds the GGUF's weights as gguf.quants decodes them, in float32, with
the demo model's own tokenizer; the converted one holds MLX's repacked format and the tokenizer
rebuilt from the GGUF's metadata. Same text means the weights, the rotary layout, the config and
the tokenizer all came across.

MLX multiplies by a quantized matrix exactly as by its decoded float32 values, so the text is
the same to the byte. The embedding is kept float32 here: MLX's quantized embedding returns its
rows in float16 (its scales' type), and a random model is chaotic enough that this rounding
alone changes its greedy text after a dozen tokens (test_gguf_weights checks those values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType as T

from exod.models.gguf.convert import convert
from tests.gguf_files import Arch, reference_values, write_reference_dir, write_tiny_gguf

PROMPTS = ["Hello, how are you?", "Grüße aus 東京 🦊 — ça va?"]


def _generate(path: Path, prompt: str, chat: bool = False) -> str:
    import mlx_lm  # MLX only for the tests that compare with it

    loaded: Any = mlx_lm.load(str(path))
    model, tokenizer = loaded[0], loaded[1]
    if chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text: str = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24, verbose=False)
    return text


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    "kind", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda k: k.name
)
def test_generation_equals_the_same_weights_as_safetensors(
    tmp_path: Path, arch: Arch, kind: T
) -> None:
    tiny = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, weight_type=kind, embed_type=T.F32)
    converted = tmp_path / "converted"
    convert(tiny.path, converted)
    reference = write_reference_dir(tiny, tmp_path / "reference")
    for prompt in PROMPTS:
        expected = _generate(reference, prompt)
        assert expected  # the comparison means something only if text came out
        assert _generate(converted, prompt) == expected
    assert _generate(converted, PROMPTS[0], chat=True) == _generate(
        reference, PROMPTS[0], chat=True
    )


def test_a_split_set_generates_like_the_whole_file(tmp_path: Path) -> None:
    whole = write_tiny_gguf(tmp_path / "whole.gguf", weight_type=T.Q4_0)
    split = write_tiny_gguf(tmp_path / "split.gguf", weight_type=T.Q4_0, split_max_tensors=6)
    assert split.path.name == "split-00001-of-00004.gguf"
    convert(whole.path, tmp_path / "a")
    convert(split.path, tmp_path / "b")
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == a
    assert _generate(tmp_path / "b", PROMPTS[0]) == _generate(tmp_path / "a", PROMPTS[0])


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda k: k.name)
def test_a_quantized_embedding_in_mlx(tmp_path: Path, kind: T) -> None:
    """Looked up, its rows are gguf's values rounded to float16; as the tied output layer it
    multiplies like those values in float32."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    tiny = write_tiny_gguf(tmp_path / "m.gguf", weight_type=T.F32, embed_type=kind)
    convert(tiny.path, tmp_path / "converted")
    loaded: Any = mlx_lm.load(str(tmp_path / "converted"))
    embed = loaded[0].model.embed_tokens
    reference = reference_values(tiny, "model.embed_tokens.weight")
    ids = mx.array(np.arange(0, 512, 7))
    rows = np.array(embed(ids).astype(mx.float32))
    expected = reference[np.arange(0, 512, 7)]
    assert np.abs(rows - expected).max() <= 2.0**-10 * np.abs(expected).max()
    x = mx.array(np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32))
    logits = np.array(embed.as_linear(x))
    np.testing.assert_allclose(logits, np.array(x) @ reference.T, rtol=0, atol=1e-5)
