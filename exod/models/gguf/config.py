"""GGUF metadata to the config.json that mlx-lm reads (Hugging Face naming).

Sizes come from the `{arch}.*` keys that llama.cpp writes; where a tensor's shape says the same
thing more surely (the vocabulary is the embedding's row count) the shape wins. llama's GGUF has
no key for Llama 3's rotary scaling: it stores the per-frequency factors as a `rope_freqs`
tensor, from which llama3_rope_scaling recovers the parameters mlx-lm expects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeGuard

from exod.errors import ExoError
from exod.models.gguf.reader import MetaValue

# GGUF architecture -> (model_type, HF class). "llama" covers Mistral-style models and SmolLM,
# which llama.cpp writes as llama.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
SUPPORTED_TEXT = "llama (Llama, Mistral-style, SmolLM), qwen2 and qwen3"

# Candidates for Llama 3's original context length when recovering its rope scaling.
_LLAMA3_ORIGINAL = (8192, 4096, 2048, 16384, 32768, 65536, 131072)


def architecture(meta: Mapping[str, MetaValue], source: str) -> str:
    """The GGUF architecture, if this converter knows it; ExoError model_unsupported if not."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ExoError(
            "model_unsupported",
            f"{source} names no architecture (general.architecture): it is not a language "
            f"model GGUF that can be converted; exod imports {SUPPORTED_TEXT}",
        )
    if arch not in ARCHITECTURES:
        raise ExoError(
            "model_unsupported",
            f"{source} is a {arch!r} model, which cannot be converted: exod imports "
            f"{SUPPORTED_TEXT} GGUF files",
        )
    return arch


def hf_config(
    meta: Mapping[str, MetaValue],
    shapes: Mapping[str, tuple[int, ...]],
    source: str,
    rope_factors: Sequence[float] | None = None,
) -> dict[str, object]:
    """config.json for the model: meta is the GGUF metadata, shapes its tensors' shapes (numpy
    order, GGUF names), rope_factors the values of a `rope_freqs.weight` tensor if it has one.
    """
    arch = architecture(meta, source)
    model_type, hf_class = ARCHITECTURES[arch]
    keys = _Keys(meta, arch, source)
    hidden = keys.integer("embedding_length")
    layers = keys.integer("block_count")
    heads = keys.integer("attention.head_count")
    kv_heads = keys.integer("attention.head_count_kv", default=heads)
    embed = shapes.get("token_embd.weight")
    if embed is None or len(embed) != 2:
        raise _incomplete(source, "the token embedding (token_embd.weight)")
    q_shape = shapes.get("blk.0.attn_q.weight")
    if q_shape is None:
        raise _incomplete(source, "the attention weights (blk.0.attn_q.weight)")
    head_dim = keys.integer("attention.key_length", default=q_shape[0] // heads)
    rope_dims = keys.integer("rope.dimension_count", default=head_dim)
    if rope_dims != head_dim:
        raise ExoError(
            "model_unsupported",
            f"{source} rotates {rope_dims} of each head's {head_dim} dimensions (partial "
            "rotary), which mlx-lm's llama and qwen2 do not do: it cannot be converted",
        )
    config: dict[str, object] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": keys.integer("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": keys.number("attention.layer_norm_rms_epsilon"),
        "vocab_size": embed[0],
        "max_position_embeddings": keys.integer("context_length"),
        "rope_theta": keys.number("rope.freq_base", default=10000.0),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    if head_dim * heads != hidden or model_type == "qwen3":
        config["head_dim"] = head_dim
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    scaling = rope_scaling(keys, rope_factors, head_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    config.update(_special_ids(meta))
    return config


def _special_ids(meta: Mapping[str, MetaValue]) -> dict[str, object]:
    """bos_token_id, and eos_token_id as every id that ends a turn (eos, end of turn, end of
    message), since mlx-lm stops at any id in the config's list."""
    out: dict[str, object] = {}
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if _is_int(bos):
        out["bos_token_id"] = bos
    ends: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if _is_int(value) and value not in ends:
            ends.append(value)
    if ends:
        out["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return out


def rope_scaling(
    keys: _Keys, rope_factors: Sequence[float] | None, head_dim: int
) -> dict[str, object] | None:
    """mlx-lm's rope_scaling from the GGUF's scaling keys or its rope_freqs tensor."""
    kind = keys.text("rope.scaling.type", default="none")
    if rope_factors is not None:
        return llama3_rope_scaling(
            rope_factors, keys.number("rope.freq_base", default=10000.0), head_dim, keys.source
        )
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": keys.number("rope.scaling.factor")}
    if kind == "yarn":
        scaling: dict[str, object] = {"type": "yarn", "factor": keys.number("rope.scaling.factor")}
        original = keys.integer("rope.scaling.original_context_length", default=0)
        if original:
            scaling["original_max_position_embeddings"] = original
        return scaling
    raise ExoError(
        "model_unsupported",
        f"{keys.source} uses rope scaling {kind!r}, which cannot be converted (linear and yarn "
        "can)",
    )


def llama3_rope_scaling(
    factors: Sequence[float], base: float, head_dim: int, source: str
) -> dict[str, object]:
    """The Llama 3 rope_scaling whose per-frequency factors are `factors`.

    llama.cpp computes them from (factor, low_freq_factor, high_freq_factor, original context)
    and keeps only the result; the usual parameters are tried and the one that reproduces every
    factor is taken. Anything else is refused rather than guessed.
    """
    if len(factors) != head_dim // 2 or not factors:
        raise ExoError(
            "model_unsupported",
            f"{source}: rope_freqs has {len(factors)} values for heads of {head_dim} dimensions: "
            "it cannot be converted",
        )
    factor = max(factors)
    for original in _LLAMA3_ORIGINAL:
        candidate = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        }
        expected = llama3_factors(
            base, head_dim, factor=factor, low=1.0, high=4.0, original=original
        )
        if all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(factors, expected, strict=True)):
            return candidate
    raise ExoError(
        "model_unsupported",
        f"{source}: its rope_freqs tensor is not a Llama 3 rope scaling that mlx-lm can "
        "reproduce: it cannot be converted",
    )


def llama3_factors(
    base: float, head_dim: int, *, factor: float, low: float, high: float, original: int
) -> list[float]:
    """The rope_freqs values llama.cpp writes for these Llama 3 scaling parameters."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


class _Keys:
    """Typed access to `{arch}.NAME` metadata, with precise errors for a missing or odd value."""

    def __init__(self, meta: Mapping[str, MetaValue], arch: str, source: str) -> None:
        self.meta, self.arch, self.source = meta, arch, source

    def _get(self, name: str) -> MetaValue | None:
        return self.meta.get(f"{self.arch}.{name}")

    def integer(self, name: str, default: int | None = None) -> int:
        value = self._get(name)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer list with one value throughout
        if value is None and default is not None:
            return default
        if isinstance(value, list):
            raise ExoError(
                "model_unsupported",
                f"{self.source} has layers of different sizes ({self.arch}.{name} varies by "
                "layer), which mlx-lm's models do not: it cannot be converted",
            )
        if not _is_int(value) or value <= 0:
            raise _missing(self.source, f"{self.arch}.{name}", value)
        return value

    def number(self, name: str, default: float | None = None) -> float:
        value = self._get(name)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise _missing(self.source, f"{self.arch}.{name}", value)
        # float32 in the file: round-trip through its shortest repr (1e-5, not 9.99999974e-06).
        return float(f"{float(value):.7g}")

    def text(self, name: str, default: str) -> str:
        value = self._get(name)
        return value if isinstance(value, str) else default


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _missing(source: str, key: str, value: object) -> ExoError:
    what = "lacks" if value is None else f"has an invalid value ({value!r}) for"
    return ExoError(
        "weights_corrupt",
        f"{source} {what} {key}, which every such GGUF carries: the file is damaged or was "
        "written by an incomplete converter",
    )


def _incomplete(source: str, what: str) -> ExoError:
    return ExoError(
        "weights_corrupt",
        f"{source} has no {what}: the file is damaged or incomplete; copy it again",
    )
