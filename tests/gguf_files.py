"""Tiny GGUF files for the tests, written with llama.cpp's own `gguf` package.

A tiny GGUF holds the same model as the demo model of the same arguments (exod.models.demo: its
random weights, its tokenizer trained on the spot) in llama.cpp's layout: GGUF tensor names,
llama's query/key rows permuted as convert_hf_to_gguf.py does, the tokenizer as `tokenizer.ggml.*`
keys. Matrices are stored in the type asked for: types that gguf.quants can quantize from the
weights are quantized, the others (K-quants, IQ types, NVFP4) are random blocks of the right byte
size whose scale fields are set to small finite values (random bytes there could be inf or NaN).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

from exod.models import demo
from exod.models.gguf.tensors import permute_rows, unpermute_rows

# Types gguf.quants can quantize (written from the weights); the rest are written as raw blocks.
QUANTIZABLE = frozenset({T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ1_0, T.TQ2_0, T.MXFP4})
# Every matrix type a GGUF may hold that the converter accepts.
MATRIX_TYPES = (
    T.F32,
    T.F16,
    T.BF16,
    T.Q4_0,
    T.Q4_1,
    T.Q8_0,
    T.Q5_0,
    T.Q5_1,
    T.Q2_K,
    T.Q3_K,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
    T.IQ2_XXS,
    T.IQ2_XS,
    T.IQ2_S,
    T.IQ3_XXS,
    T.IQ3_S,
    T.IQ1_S,
    T.IQ1_M,
    T.IQ4_NL,
    T.IQ4_XS,
    T.TQ1_0,
    T.TQ2_0,
    T.MXFP4,
    T.NVFP4,
)
# Byte offsets of each block's float16 scale fields, for the types written as random blocks.
_F16_FIELDS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ2_XXS: (0,),
    T.IQ2_XS: (0,),
    T.IQ2_S: (0,),
    T.IQ3_XXS: (0,),
    T.IQ3_S: (0,),
    T.IQ1_S: (0,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}

_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

Weights = dict[str, npt.NDArray[np.float32]]
# The demo's architectures, and qwen3 made from its qwen2 (no biases, a norm on q and k).
Arch = Literal["llama", "qwen2", "qwen3"]


@dataclass
class TinyGGUF:
    """What was written: the file (the first part of a split set), the demo config, and for
    every GGUF tensor its type and raw data as stored (llama's q/k rows still permuted)."""

    path: Path
    config: dict[str, Any]
    weights: Weights  # the demo's float32 weights, by mlx-lm name
    stored: dict[str, tuple[T, npt.NDArray[Any]]] = field(default_factory=dict)


def _as_qwen3(config: dict[str, Any], weights: Weights, rng: np.random.Generator) -> None:
    """The qwen2 demo model turned into a qwen3 one, in place."""
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    for name in [n for n in weights if n.endswith(".bias")]:
        del weights[name]
    for layer in range(config["num_hidden_layers"]):
        for norm in ("q_norm", "k_norm"):
            scale = 1 + 0.1 * rng.standard_normal(config["head_dim"], dtype=np.float32)
            weights[f"model.layers.{layer}.self_attn.{norm}.weight"] = scale


def gguf_name(hf: str) -> str:
    """The GGUF tensor name of an mlx-lm parameter name."""
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER[module]}.{kind}"


def write_tiny_gguf(
    path: Path,
    *,
    arch: Arch = "llama",
    weight_type: T = T.F32,
    embed_type: T | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 512,
    split_max_tensors: int = 0,
    meta: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> TinyGGUF:
    """Write the demo model of these arguments as GGUF: matrices in weight_type (the embedding
    in embed_type, default the same), norms and biases in F32. meta adds or replaces keys (by
    full name: str, int (uint32), float (float32), bool, lists); drop leaves keys out."""
    tokenizer = demo.train_tokenizer(vocab_size)
    config = demo.model_config(
        "llama" if arch == "llama" else "qwen2",
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.get_vocab()[demo.IM_END],
    )
    weights = demo.random_weights(config, seed=seed, quiet_ids=demo.quiet_token_ids(tokenizer))
    if arch == "qwen3":
        _as_qwen3(config, weights, np.random.default_rng(seed + 3))
    rng = np.random.default_rng(seed + 1000)
    writer = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    keys = metadata(arch, config, tokenizer)
    keys.update(meta or {})
    for key, value in keys.items():
        if key not in drop and key != "general.architecture":
            add_value(writer, key, value)
    tiny = TinyGGUF(path=path, config=config, weights=weights)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name, original in weights.items():
        value = original
        if arch == "llama" and ".q_proj." in name:
            value = permute_rows(original, heads)  # as llama.cpp's converter stores them
        elif arch == "llama" and ".k_proj." in name:
            value = permute_rows(original, kv_heads)
        kind = T.F32
        if value.ndim == 2:
            kind = weight_type
            if "embed_tokens" in name and embed_type is not None:
                kind = embed_type
        raw = encode(value, kind, rng)
        tiny.stored[gguf_name(name)] = (kind, raw)
        if kind in (T.F32, T.F16):
            writer.add_tensor(gguf_name(name), raw)
        else:
            writer.add_tensor(gguf_name(name), raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        count = -(-len(weights) // split_max_tensors)
        tiny.path = path.with_name(f"{path.stem}-00001-of-{count:05d}.gguf")
    return tiny


def encode(values: npt.NDArray[np.float32], kind: T, rng: np.random.Generator) -> npt.NDArray[Any]:
    """values stored as kind: float arrays for F32/F16, raw uint8 rows for the others."""
    if kind == T.F32:
        return values.astype(np.float32)
    if kind == T.F16:
        return values.astype(np.float16)
    if kind in QUANTIZABLE:
        raw: npt.NDArray[Any] = quants.quantize(values, kind)
        return raw
    return random_blocks(values.shape, kind, rng)


def random_blocks(shape: tuple[int, ...], kind: T, rng: np.random.Generator) -> npt.NDArray[Any]:
    """Random raw rows of kind for a (rows, cols) tensor, with small finite scales."""
    block, size = GGML_QUANT_SIZES[kind]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(0.002, 0.02, size=blocks.shape[:2]).astype(np.float16).view(np.uint8)
    small = scale.reshape(*blocks.shape[:2], 2)
    for offset in _F16_FIELDS.get(kind, ()):
        blocks[..., offset : offset + 2] = small
    if kind == T.IQ1_M:
        # Its float16 scale is spread over the top nibbles of its last four uint16 words.
        bits = scale.view(np.uint16).reshape(blocks.shape[:2])
        words = blocks[..., 48:56].copy().view("<u2")
        for k in range(4):
            words[..., k] = (words[..., k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
        blocks[..., 48:56] = words.view(np.uint8)
    if kind == T.NVFP4:
        # Four unsigned e4m3 scales per block: keep them small and finite.
        blocks[..., :4] = rng.integers(0x20, 0x30, size=(*blocks.shape[:2], 4), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def reference_values(tiny: TinyGGUF, name: str) -> npt.NDArray[np.float32]:
    """gguf.quants.dequantize of a stored tensor, with llama's q/k rows put back in order."""
    kind, raw = tiny.stored[gguf_name(name)]
    dense = kind in (T.F32, T.F16)
    values = raw.astype(np.float32) if dense else quants.dequantize(raw, kind)
    if tiny.config["model_type"] == "llama":
        if ".q_proj." in name:
            values = unpermute_rows(values, tiny.config["num_attention_heads"])
        elif ".k_proj." in name:
            values = unpermute_rows(values, tiny.config["num_key_value_heads"])
    return values.astype(np.float32)


def write_reference_dir(tiny: TinyGGUF, dest: Path) -> Path:
    """The same weights (dequantized by gguf.quants) as a float32 safetensors model with the
    demo tokenizer: what the converted GGUF must behave like."""
    dest.mkdir(parents=True)
    weights = {name: reference_values(tiny, name) for name in tiny.weights}
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "mlx"})
    tokenizer = demo.train_tokenizer(tiny.config["vocab_size"])
    (dest / "config.json").write_text(json.dumps(tiny.config))
    (dest / "tokenizer.json").write_text(tokenizer.to_str())
    (dest / "tokenizer_config.json").write_text(json.dumps(demo.tokenizer_config(True, tokenizer)))
    return dest


def metadata(arch: str, config: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The GGUF metadata llama.cpp writes for a model of this config and tokenizer."""
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in demo.SPECIAL_TOKENS else 1 for t in tokens]
    return {
        "general.architecture": arch,
        "general.name": f"tiny {arch}",
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.rope.freq_base": float(config["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": vocab[demo.IM_END],
        "tokenizer.ggml.padding_token_id": vocab[demo.ENDOFTEXT],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": demo.CHAT_TEMPLATE,
    }


def add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    """Add one metadata value, typed as llama.cpp types it."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif key == "tokenizer.ggml.token_type":
        writer.add_array(key, [int(v) for v in value])  # int32, as llama.cpp writes them
    else:
        writer.add_array(key, value)


_ST_DTYPES: dict[str, str] = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "U32": "<u4"}


def load_converted(model_dir: Path) -> dict[str, tuple[str, npt.NDArray[Any]]]:
    """Every entry of the model's safetensors files as (safetensors dtype, array); BF16 comes as
    the uint16 bit patterns (numpy has no bfloat16), bf16_to_f32 decodes them."""
    out: dict[str, tuple[str, npt.NDArray[Any]]] = {}
    for file in sorted(model_dir.glob("model*.safetensors")):
        data = file.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        base = 8 + length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            array = np.frombuffer(data[base + begin : base + end], dtype=_ST_DTYPES[info["dtype"]])
            out[name] = (info["dtype"], array.reshape(info["shape"]))
    return out


def bf16_to_f32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def mlx_values(entries: dict[str, tuple[str, npt.NDArray[Any]]], name: str) -> npt.NDArray[Any]:
    """The float64 values an mlx-lm parameter holds: dense as stored, quantized ones decoded
    from MLX's affine format (scale * q + bias per group of 32) in numpy."""
    module = name.rsplit(".", 1)[0]
    dtype, array = entries[name]
    if f"{module}.scales" not in entries or not name.endswith(".weight"):
        return (bf16_to_f32(array) if dtype == "BF16" else array).astype(np.float64)
    scales = entries[f"{module}.scales"][1].astype(np.float64)
    biases = entries[f"{module}.biases"][1].astype(np.float64)
    cols = scales.shape[1] * 32
    bits = array.shape[1] * 32 // cols
    q = unpack(array, bits).reshape(array.shape[0], -1, 32)
    values: npt.NDArray[Any] = (q * scales[..., None] + biases[..., None]).reshape(-1, cols)
    return values


def unpack(packed: npt.NDArray[np.uint32], bits: int) -> npt.NDArray[np.uint32]:
    """MLX's packing undone: value k of a row is bits [k * bits, (k + 1) * bits) of the row's
    little-endian bit stream."""
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    digits = stream.reshape(packed.shape[0], -1, bits).astype(np.uint32)
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    unpacked: npt.NDArray[np.uint32] = (digits * weights).sum(axis=-1, dtype=np.uint32)
    return unpacked
