"""inspect.kv_bytes_per_token: the KV cache one token takes, read from config.json alone."""

from __future__ import annotations

from typing import Any

import pytest

from exod.models.demo import model_config
from exod.models.inspect import kv_bytes_per_token

LLAMA3_8B = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # K and V x layers x KV heads x head size x element size
        (LLAMA3_8B, 2 * 32 * 8 * 128 * 2),
        ({**LLAMA3_8B, "torch_dtype": "float32"}, 2 * 32 * 8 * 128 * 4),
        ({**LLAMA3_8B, "torch_dtype": "float16"}, 2 * 32 * 8 * 128 * 2),
        # no dtype, or one we do not know: float32, the most it can be
        ({k: v for k, v in LLAMA3_8B.items() if k != "torch_dtype"}, 2 * 32 * 8 * 128 * 4),
        ({**LLAMA3_8B, "torch_dtype": "int4"}, 2 * 32 * 8 * 128 * 4),
        ({**LLAMA3_8B, "torch_dtype": None, "dtype": "bfloat16"}, 2 * 32 * 8 * 128 * 2),
        # no GQA: as many KV heads as heads
        ({**LLAMA3_8B, "num_key_value_heads": None}, 2 * 32 * 32 * 128 * 2),
        # an explicit head size wins over hidden / heads (Gemma)
        ({**LLAMA3_8B, "head_dim": 256}, 2 * 32 * 8 * 256 * 2),
        # a multimodal config keeps the text model's sizes in text_config
        ({"model_type": "x", "torch_dtype": "float16", "text_config": {**LLAMA3_8B}}, 131072),
        ({"model_type": "x", "text_config": {**LLAMA3_8B, "torch_dtype": None}}, 262144),
        # sizes missing or nonsense: unknown
        ({"model_type": "llama"}, 0),
        ({**LLAMA3_8B, "num_hidden_layers": 0}, 0),
        ({**LLAMA3_8B, "num_attention_heads": True}, 0),
        ({**LLAMA3_8B, "num_hidden_layers": "32"}, 0),
    ],
)
def test_kv_bytes_per_token(config: dict[str, Any], expected: int) -> None:
    assert kv_bytes_per_token(config) == expected


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_demo_models_take_512_bytes_a_token(arch: str) -> None:
    config = model_config(
        arch,  # type: ignore[arg-type]  # a Literal taken from a parametrize string
        hidden_size=64,
        num_layers=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=2048,
        eos_token_id=0,
    )
    # 4 heads of 16 dims, 2 of them for K/V, float32
    assert kv_bytes_per_token(config) == 2 * 2 * 2 * 16 * 4
