"""GGUF tensors to mlx-lm's: names, llama's rotary layout, and MLX's quantized format.

Each GGUF tensor becomes one mlx-lm parameter (a quantized one becomes three: `weight` packed
into uint32, `scales` and `biases`, one of each per group of 32 values, as MLX's affine
quantization lays them out: value = scale * q + bias). By type:

- F32 and F16 are kept as they are; BF16 is kept as bfloat16 (the same bytes).
- Q4_0, Q4_1 and Q8_0 are repacked exactly into 4-, 4- and 8-bit affine groups of 32: their
  blocks are groups of 32 with one float16 scale (and, for Q4_1, a float16 minimum), so
  Q4_0's d * (q - 8) is scale d and bias -8d, Q4_1's d * q + m is scale d and bias m, and
  Q8_0's d * q (q signed) is scale d and bias -128d over q + 128. Every value is the same.
- Every other type gguf.quants can decode (the K-quants, the IQ and TQ types, Q5_0, Q5_1,
  MXFP4, NVFP4) is decoded to float32 and quantized again to MLX affine with group size 32 and
  float16 scales and biases, at REQUANT_BITS: 4 bits for sources of 3 bits or fewer per value
  (Q2_K, Q3_K, IQ1-IQ3, TQ1_0, TQ2_0), 6 bits for 4- and 5-bit sources (Q4_K, Q5_K, Q5_0, Q5_1,
  IQ4_NL, IQ4_XS, MXFP4, NVFP4), 8 bits for Q6_K. A source grid seldom lines up with MLX's, so
  the widths are above the source's to keep the added error (at most half a step of the new
  grid, by construction of min/max rounding) small beside the source's own.
- A one-dimensional tensor of a quantized type (none of the usual converters write one) is
  decoded to float32.

llama.cpp stores llama's query and key rows permuted for its interleaved rotary form; they are
put back in the Hugging Face order that mlx-lm's (non-interleaved) rotary embedding expects. The
permutation moves whole rows within a head, so it is exact on quantized rows too.

Work is done a chunk of rows at a time (whole heads where rows are permuted), so memory stays
near CHUNK_VALUES float32 values whatever the tensor's size.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as T
from gguf import quants

from exod.errors import ExoError
from exod.models.gguf.reader import Tensor

GROUP_SIZE = 32
# Rows are converted in chunks of about this many values (4 MiB of float32; a re-quantized
# chunk needs a few times that while it is worked on).
CHUNK_VALUES = 1024 * 1024

DENSE = {T.F32: "F32", T.F16: "F16", T.BF16: "BF16"}
EXACT_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q8_0: 8}
REQUANT_BITS = {
    **dict.fromkeys(
        (T.Q2_K, T.Q3_K, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S),
        4,
    ),
    T.TQ1_0: 4,
    T.TQ2_0: 4,
    **dict.fromkeys(
        (T.Q4_K, T.Q5_K, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS, T.MXFP4, T.NVFP4),
        6,
    ),
    T.Q6_K: 8,
}

# GGUF tensor names (within a block, after "blk.N.") -> mlx-lm names (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors that carry configuration, not parameters (read by config, not written).
CONFIG_TENSORS = frozenset({"rope_freqs.weight"})

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Output:
    """One safetensors entry: name, safetensors dtype, full shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        size = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}[self.dtype]
        cols = self.shape[-1] if len(self.shape) > 1 else self.shape[0]
        return cols * size

    @property
    def n_bytes(self) -> int:
        rows = self.shape[0] if len(self.shape) > 1 else 1
        return rows * self.row_bytes


@dataclass(frozen=True)
class TensorPlan:
    """How one GGUF tensor becomes mlx-lm parameters.

    bits is 0 for a tensor kept dense; unpermute_heads is the head count whose rows llama.cpp
    permuted (0: none); exact tells whether every value is kept as it is.
    """

    source: Tensor
    name: str
    bits: int
    exact: bool
    unpermute_heads: int

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def outputs(self) -> tuple[Output, ...]:
        shape = self.source.shape
        if self.bits == 0:
            dtype = DENSE.get(self.source.type, "F32")
            return (Output(self.name, dtype, shape),)
        rows, cols = shape
        groups = cols // GROUP_SIZE
        return (
            Output(self.name, "U32", (rows, cols * self.bits // 32)),
            Output(f"{self.module}.scales", "F16", (rows, groups)),
            Output(f"{self.module}.biases", "F16", (rows, groups)),
        )

    def chunk_rows(self) -> int:
        """Rows converted at once: about CHUNK_VALUES values, whole heads when unpermuting."""
        rows = max(1, CHUNK_VALUES // max(1, self.source.shape[-1]))
        if self.unpermute_heads and len(self.source.shape) == 2:
            per_head = self.source.shape[0] // self.unpermute_heads
            rows = max(per_head, rows // per_head * per_head)
        return rows if len(self.source.shape) == 2 else 1

    def convert(self, raw: npt.NDArray[np.uint8]) -> list[Array]:
        """The outputs' rows for these raw GGUF rows (whole heads when unpermuting)."""
        two_d = len(self.source.shape) == 2
        if self.unpermute_heads and two_d:
            raw = unpermute_rows(
                raw, raw.shape[0] // (self.source.shape[0] // self.unpermute_heads)
            )
        kind = self.source.type
        if self.bits == 0:
            out = raw.view(_NUMPY_DENSE[kind]) if kind in DENSE else dequantize(raw, kind)
            if self.unpermute_heads and not two_d:
                out = unpermute_rows(out.reshape(-1, 1), self.unpermute_heads).reshape(out.shape)
            return [out]
        if kind in EXACT_BITS:
            return list(repack_exact(raw, kind))
        return list(requantize(dequantize(raw, kind), self.bits))


_NUMPY_DENSE: dict[T, npt.DTypeLike] = {T.F32: "<f4", T.F16: "<f2", T.BF16: "<u2"}


def hf_name(gguf_name: str) -> str | None:
    """The mlx-lm parameter name for a GGUF tensor name; None for a name this does not map."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _LAYER.match(gguf_name)
    if match is None or match[2] not in _LAYER_NAMES:
        return None
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"


def plan_tensors(
    tensors: Mapping[str, Tensor], config: Mapping[str, object], source: str
) -> list[TensorPlan]:
    """A plan for every tensor, checked against the shapes the config calls for.

    Raises ExoError before anything is written: model_unsupported for a tensor type or name
    that cannot be converted, weights_corrupt for a tensor missing or of the wrong shape.
    """
    model_type = str(config["model_type"])
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads")
    expected = expected_shapes(config)
    plans: list[TensorPlan] = []
    for tensor in tensors.values():
        if tensor.name in CONFIG_TENSORS:
            continue
        name = hf_name(tensor.name)
        if name is None or name not in expected:
            raise ExoError(
                "model_unsupported",
                f"{source} holds tensor {tensor.name!r}, which mlx-lm's {model_type} has no "
                "place for: this variant cannot be converted",
            )
        if tensor.shape != expected[name]:
            raise ExoError(
                "weights_corrupt",
                f"{source}: tensor {tensor.name!r} has shape {_dims(tensor.shape)}, its "
                f"metadata calls for {_dims(expected[name])}: the file is damaged or its "
                "metadata wrong",
            )
        bits, exact = _format(tensor, source)
        unpermute = 0
        if model_type == "llama" and ".self_attn.q_proj." in name:
            unpermute = heads
        elif model_type == "llama" and ".self_attn.k_proj." in name:
            unpermute = kv_heads
        plans.append(TensorPlan(tensor, name, bits, exact, unpermute))
    missing = sorted(set(expected) - {p.name for p in plans})
    if missing:
        raise ExoError(
            "weights_corrupt",
            f"{source} lacks {len(missing)} tensor(s) the model needs (e.g. {missing[0]}): the "
            "file is damaged or incomplete; copy it again",
        )
    return plans


def _format(tensor: Tensor, source: str) -> tuple[int, bool]:
    """(bits, exact) for a tensor: bits 0 means dense."""
    kind = tensor.type
    if kind in DENSE:
        return 0, True
    if kind not in EXACT_BITS and kind not in REQUANT_BITS:
        raise ExoError(
            "model_unsupported",
            f"{source}: tensor {tensor.name!r} is of type {kind.name}, which cannot be "
            "converted: use a file quantized as Q4_0, Q4_1, Q8_0, a K-quant (e.g. Q4_K_M), "
            "an IQ type, F16, BF16 or F32",
        )
    if len(tensor.shape) != 2:
        return 0, False
    if kind in EXACT_BITS:
        return EXACT_BITS[kind], True
    return REQUANT_BITS[kind], False


def expected_shapes(config: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """mlx-lm's parameter names and (unquantized) shapes for this config."""
    model_type = str(config["model_type"])
    hidden = _int(config, "hidden_size")
    inter = _int(config, "intermediate_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads")
    head_dim = _int(config, "head_dim") if "head_dim" in config else hidden // heads
    q_bias = model_type == "qwen2" or config.get("attention_bias") is True
    o_bias = model_type == "llama" and config.get("attention_bias") is True
    mlp_bias = config.get("mlp_bias") is True
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (_int(config, "vocab_size"), hidden),
        "model.norm.weight": (hidden,),
    }
    if config.get("tie_word_embeddings") is False:
        shapes["lm_head.weight"] = (_int(config, "vocab_size"), hidden)
    linear = {
        "self_attn.q_proj": (heads * head_dim, hidden, q_bias),
        "self_attn.k_proj": (kv_heads * head_dim, hidden, q_bias),
        "self_attn.v_proj": (kv_heads * head_dim, hidden, q_bias),
        "self_attn.o_proj": (hidden, heads * head_dim, o_bias),
        "mlp.gate_proj": (inter, hidden, mlp_bias),
        "mlp.up_proj": (inter, hidden, mlp_bias),
        "mlp.down_proj": (hidden, inter, mlp_bias),
    }
    for i in range(_int(config, "num_hidden_layers")):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        if model_type == "qwen3":
            shapes[f"{p}.self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (head_dim,)
        for module, (out, inp, bias) in linear.items():
            shapes[f"{p}.{module}.weight"] = (out, inp)
            if bias:
                shapes[f"{p}.{module}.bias"] = (out,)
    return shapes


def quantization_config(plans: list[TensorPlan]) -> dict[str, object] | None:
    """config.json's "quantization": the most common width as the default, and an entry for
    every module whose format differs (another width, or False for one kept dense)."""
    matrices = [p for p in plans if len(p.source.shape) == 2 and p.name.endswith(".weight")]
    widths = Counter(p.bits for p in matrices if p.bits)
    if not widths:
        return None
    default = widths.most_common(1)[0][0]
    quant: dict[str, object] = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for p in matrices:
        if p.bits == 0:
            quant[p.module] = False
        elif p.bits != default:
            quant[p.module] = {"group_size": GROUP_SIZE, "bits": p.bits, "mode": "affine"}
    return quant


def unpermute_rows(rows: Array, n_head: int) -> Array:
    """Undo llama.cpp's permutation of query/key rows (its `permute` in convert_hf_to_gguf).

    Within each head llama.cpp interleaves the two halves of the rows (row 2i + j holds Hugging
    Face's row j * half + i); this puts them back. rows is (n_head * head_dim, ...).
    """
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def permute_rows(rows: Array, n_head: int) -> Array:
    """llama.cpp's permutation (the inverse of unpermute_rows), for tests and tools."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def dequantize(raw: npt.NDArray[np.uint8], kind: T) -> npt.NDArray[np.float32]:
    """Raw GGUF rows of a quantized type as float32 values (gguf.quants, the reference)."""
    values: npt.NDArray[np.float32] = quants.dequantize(raw, kind)
    return values


def repack_exact(
    raw: npt.NDArray[np.uint8], kind: T
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float16], npt.NDArray[np.float16]]:
    """Q4_0, Q4_1 or Q8_0 rows as MLX affine (packed, scales, biases); every value the same."""
    rows = raw.shape[0]
    if kind == T.Q8_0:
        blocks = raw.reshape(rows, -1, 34)
        d = blocks[..., :2].copy().view("<f2")[..., 0]
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scales, biases = d, _f16(d.astype(np.float32) * -128)
        return pack(q.reshape(rows, -1), 8), scales, biases
    size = 18 if kind == T.Q4_0 else 20
    blocks = raw.reshape(rows, -1, size)
    d = blocks[..., :2].copy().view("<f2")[..., 0]
    if kind == T.Q4_0:
        biases = _f16(d.astype(np.float32) * -8)
        nibbles = blocks[..., 2:]
    else:
        biases = blocks[..., 2:4].copy().view("<f2")[..., 0]
        nibbles = blocks[..., 4:]
    # A block's values 0-15 are the low nibbles of its 16 bytes, values 16-31 the high ones.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    return pack(q.reshape(rows, -1), 4), d, biases


def requantize(
    values: npt.NDArray[np.float32], bits: int
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float16], npt.NDArray[np.float16]]:
    """MLX affine quantization of (rows, cols) values: groups of 32, min/max range, float16
    scale and bias; q is rounded against the float16 scale and bias actually stored."""
    rows, cols = values.shape
    groups = values.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    low = groups.min(axis=-1)
    high = groups.max(axis=-1)
    levels = (1 << bits) - 1
    biases = _f16(low)
    scales = _f16((high - low) / levels)
    scale32 = scales.astype(np.float32)[..., None]
    safe = np.where(scale32 == 0, np.float32(1), scale32)
    q = np.rint((groups - biases.astype(np.float32)[..., None]) / safe)
    q = np.clip(q, 0, levels).astype(np.uint8)
    return pack(q.reshape(rows, cols), bits), scales, biases


def pack(q: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.uint32]:
    """Pack (rows, cols) values of `bits` bits as MLX does: a little-endian bit stream in
    uint32 words, value k at bits [k * bits, (k + 1) * bits)."""
    rows = q.shape[0]
    if bits == 8:
        return np.ascontiguousarray(q).view("<u4").reshape(rows, -1)
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4)).view("<u4").reshape(rows, -1)
    # Any width: 32 values fill exactly `bits` words; place value k of each run of 32 at bit
    # k * bits, spilling into the next word where it straddles two.
    values = q.reshape(rows, -1, 32).astype(np.uint32)
    words = np.zeros((rows, values.shape[1], bits), dtype=np.uint32)
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        words[..., word] |= values[..., k] << np.uint32(shift)
        if shift + bits > 32:
            words[..., word + 1] |= values[..., k] >> np.uint32(32 - shift)
    return words.reshape(rows, -1)


def _f16(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float16]:
    with np.errstate(over="raise"):
        try:
            return values.astype(np.float16)
        except FloatingPointError:
            raise ExoError(
                "model_unsupported",
                "a weight group spans a range wider than float16 holds (over 65504): this "
                "model cannot be converted to MLX's float16 scales",
            ) from None


def _int(config: Mapping[str, object], key: str) -> int:
    value = config[key]
    if not isinstance(value, int):
        raise TypeError(f"config {key} is not an int")
    return value


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)
