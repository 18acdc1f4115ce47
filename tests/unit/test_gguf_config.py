"""GGUF metadata to config.json for mlx-lm: the llama family (SmolLM2's own values), qwen2,
qwen3, tied or untied embeddings, rope scaling, and precise refusals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from exod.errors import ExoError
from exod.models.gguf.config import hf_config, llama3_factors
from exod.models.gguf.reader import MetaValue

# SmolLM2-135M-Instruct's GGUF metadata (the keys config reads), float32 values as stored.
SMOLLM2: dict[str, MetaValue] = {
    "general.architecture": "llama",
    "llama.block_count": 30,
    "llama.context_length": 8192,
    "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.rope.freq_base": 100000.0,
    "llama.attention.layer_norm_rms_epsilon": 9.999999747378752e-06,
    "llama.vocab_size": 49152,
    "llama.rope.dimension_count": 64,
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}
SMOLLM2_SHAPES = {"token_embd.weight": (49152, 576), "blk.0.attn_q.weight": (576, 576)}


def _config(meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
    return hf_config(meta, shapes or SMOLLM2_SHAPES, "m.gguf")


def _refusal(meta: dict[str, Any], shapes: Mapping[str, tuple[int, ...]] | None = None) -> ExoError:
    with pytest.raises(ExoError) as caught:
        _config(meta, shapes)
    return caught.value


def test_smollm2() -> None:
    assert _config(SMOLLM2) == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def test_untied_embeddings_and_a_vocabulary_from_the_embedding() -> None:
    shapes = {**SMOLLM2_SHAPES, "output.weight": (49152, 576), "token_embd.weight": (49160, 576)}
    config = _config(SMOLLM2, shapes)
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == 49160


def test_qwen2() -> None:
    meta = {k.replace("llama.", "qwen2."): v for k, v in SMOLLM2.items()}
    meta["general.architecture"] = "qwen2"
    config = _config(meta)
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert "attention_bias" not in config  # qwen2 always has q/k/v biases


def test_qwen3_states_its_head_dim() -> None:
    meta = {k.replace("llama.", "qwen3."): v for k, v in SMOLLM2.items()}
    meta.update({"general.architecture": "qwen3", "qwen3.attention.key_length": 128})
    meta["qwen3.rope.dimension_count"] = 128
    config = _config(meta, {**SMOLLM2_SHAPES, "blk.0.attn_q.weight": (9 * 128, 576)})
    assert config["head_dim"] == 128


def test_every_end_of_turn_token_stops() -> None:
    config = _config({**SMOLLM2, "tokenizer.ggml.eot_token_id": 7})
    assert config["eos_token_id"] == [2, 7]


def test_a_per_layer_list_of_one_value_is_that_value() -> None:
    assert (
        _config({**SMOLLM2, "llama.attention.head_count_kv": [3] * 30})["num_key_value_heads"] == 3
    )
    error = _refusal({**SMOLLM2, "llama.attention.head_count_kv": [3] * 29 + [1]})
    assert error.reason == "model_unsupported"
    assert "llama.attention.head_count_kv varies by layer" in error.message


def test_unknown_architecture_is_named() -> None:
    error = _refusal({**SMOLLM2, "general.architecture": "mamba"})
    assert error.reason == "model_unsupported"
    assert error.message == (
        "m.gguf is a 'mamba' model, which cannot be converted: exod imports llama (Llama, "
        "Mistral-style, SmolLM), qwen2 and qwen3 GGUF files"
    )
    assert _refusal({}).reason == "model_unsupported"


def test_a_missing_size_is_named() -> None:
    meta = {k: v for k, v in SMOLLM2.items() if k != "llama.block_count"}
    error = _refusal(meta)
    assert error.reason == "weights_corrupt"
    assert "lacks llama.block_count" in error.message
    error = _refusal({**SMOLLM2, "llama.embedding_length": "wide"})
    assert "invalid value ('wide') for llama.embedding_length" in error.message


def test_partial_rotary_is_refused() -> None:
    error = _refusal({**SMOLLM2, "llama.rope.dimension_count": 32})
    assert error.reason == "model_unsupported"
    assert "partial rotary" in error.message


@pytest.mark.parametrize(("factor", "original"), [(8.0, 8192), (32.0, 8192), (16.0, 4096)])
def test_llama3_rope_scaling_is_recovered_from_rope_freqs(factor: float, original: int) -> None:
    base, head_dim = 500000.0, 64
    factors = llama3_factors(base, head_dim, factor=factor, low=1.0, high=4.0, original=original)
    meta = {**SMOLLM2, "llama.rope.freq_base": base}
    config = hf_config(meta, SMOLLM2_SHAPES, "m.gguf", factors)
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }


def test_rope_freqs_of_another_shape_are_refused() -> None:
    factors = [1.0] * 16 + [3.0] * 16
    with pytest.raises(ExoError) as caught:
        hf_config(SMOLLM2, SMOLLM2_SHAPES, "m.gguf", factors)
    assert caught.value.reason == "model_unsupported"
    assert "not a Llama 3 rope scaling" in caught.value.message


def test_linear_and_yarn_rope_scaling() -> None:
    linear = {**SMOLLM2, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    assert _config(linear)["rope_scaling"] == {"type": "linear", "factor": 2.0}
    yarn = {
        **SMOLLM2,
        "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 32768,
    }
    assert _config(yarn)["rope_scaling"] == {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    error = _refusal({**SMOLLM2, "llama.rope.scaling.type": "longrope"})
    assert "rope scaling 'longrope'" in error.message
