"""GGUF tensors imported into MLX's layout: every type equals gguf.quants.dequantize of the same
tensor within the target format's rounding, llama's q/k rows come back in Hugging Face order,
and the packing is MLX's own."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from gguf import GGMLQuantizationType as T

from exod.models.gguf import tensors
from exod.models.gguf.convert import convert
from exod.models.gguf.tensors import (
    EXACT_BITS,
    REQUANT_BITS,
    pack,
    permute_rows,
    quantization_config,
    requantize,
    unpermute_rows,
)
from tests.gguf_files import (
    MATRIX_TYPES,
    Arch,
    TinyGGUF,
    load_converted,
    mlx_values,
    reference_values,
    write_tiny_gguf,
)

# K-quant and IQ blocks hold 256 values: rows need to be that long (hidden 256, MLP 512).
WIDE = 256
Entries = dict[str, tuple[str, npt.NDArray[Any]]]


@cache
def _converted(root: Path, arch: Arch, kind: T) -> tuple[TinyGGUF, Entries]:
    tiny = write_tiny_gguf(
        root / f"{arch}-{kind.name}.gguf",
        arch=arch,
        weight_type=kind,
        hidden_size=WIDE,
        intermediate_size=2 * WIDE,
    )
    dest = root / f"{arch}-{kind.name}"
    convert(tiny.path, dest)
    return tiny, load_converted(dest)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-weights")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", MATRIX_TYPES, ids=lambda k: k.name)
def test_each_type_equals_gguf_dequantize(root: Path, arch: Arch, kind: T) -> None:
    tiny, entries = _converted(root, arch, kind)
    assert set(tiny.weights) <= set(entries)
    for name in tiny.weights:
        reference = reference_values(tiny, name).astype(np.float64)
        got = mlx_values(entries, name)
        assert got.shape == reference.shape, name
        if reference.ndim == 1 or kind in (T.F32, T.F16, T.BF16):
            np.testing.assert_array_equal(got, reference, err_msg=name)
        elif kind in EXACT_BITS:
            # Q4_0, Q4_1, Q8_0: the same values (gguf computes them in float32).
            np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-9, err_msg=name)
        else:
            _assert_within_half_a_step(entries, name, got, reference)


def _assert_within_half_a_step(
    entries: Entries, name: str, got: npt.NDArray[Any], reference: npt.NDArray[Any]
) -> None:
    """Re-quantized: each value within half a step of its group's grid, plus float16 rounding of
    the stored scale and bias."""
    module = name.rsplit(".", 1)[0]
    scales = entries[f"{module}.scales"][1].astype(np.float64)
    biases = entries[f"{module}.biases"][1].astype(np.float64)
    bits = entries[name][1].shape[1] * 32 // reference.shape[1]
    levels = (1 << bits) - 1
    tolerance = 0.5 * scales + 2.0**-10 * (np.abs(biases) + levels * scales) + 1e-7
    error = np.abs(got - reference).reshape(*scales.shape, 32)
    assert (error <= tolerance[..., None]).all(), name


@pytest.mark.parametrize(
    "kind", [T.F32, T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.BF16], ids=lambda k: k.name
)
def test_stored_formats(root: Path, kind: T) -> None:
    """Dense types keep their dtype; quantized matrices become MLX affine of the stated width."""
    _, entries = _converted(root, "qwen2", kind)
    q_proj = "model.layers.0.self_attn.q_proj"
    norm_dtype, _ = entries["model.layers.0.input_layernorm.weight"]
    assert norm_dtype == "F32"
    assert entries[f"{q_proj}.bias"][0] == "F32"
    if kind in (T.F32, T.BF16):
        assert entries[f"{q_proj}.weight"][0] == {T.F32: "F32", T.BF16: "BF16"}[kind]
        assert f"{q_proj}.scales" not in entries
        return
    bits = EXACT_BITS.get(kind) or REQUANT_BITS[kind]
    dtype, packed = entries[f"{q_proj}.weight"]
    assert dtype == "U32"
    assert packed.shape == (256, 256 * bits // 32)
    assert entries[f"{q_proj}.scales"][0] == "F16"
    assert entries[f"{q_proj}.scales"][1].shape == (256, 256 // 32)
    assert entries[f"{q_proj}.biases"][1].shape == (256, 256 // 32)


def test_llama_queries_and_keys_come_back_in_hugging_face_order(root: Path) -> None:
    """Against the demo's own weights, not the un-permutation under test."""
    tiny, entries = _converted(root, "llama", T.F32)
    for layer in range(2):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            np.testing.assert_array_equal(entries[name][1], tiny.weights[name])


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rows = np.arange(8 * 16 * 3).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        assert np.array_equal(unpermute_rows(permute_rows(rows, heads), heads), rows)
        assert not np.array_equal(permute_rows(rows, heads), rows)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_mlx_layout(bits: int) -> None:
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(3, 64), dtype=np.uint8)
    ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
    unpacked = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(unpacked), q.astype(np.float32))


def test_requantize_hits_the_ends_of_each_group() -> None:
    values = np.linspace(-1, 3, 64, dtype=np.float32).reshape(1, 64)
    packed, scales, biases = requantize(values, 4)
    assert packed.shape == (1, 8)
    assert biases.tolist() == [[np.float16(-1), np.float16(values[0, 32])]]
    constant = np.full((1, 32), 0.5, dtype=np.float32)
    _, scales, biases = requantize(constant, 4)
    assert scales.tolist() == [[0.0]] and biases.tolist() == [[0.5]]


def test_chunks_give_the_same_bytes_as_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converting a few rows at a time (whole heads for q/k) changes nothing."""
    tiny = write_tiny_gguf(
        tmp_path / "m.gguf", weight_type=T.Q4_K, hidden_size=WIDE, intermediate_size=2 * WIDE
    )
    convert(tiny.path, tmp_path / "whole")
    monkeypatch.setattr(tensors, "CHUNK_VALUES", 300)  # about one row, rounded up to a head
    convert(tiny.path, tmp_path / "chunked")
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "chunked" / "model.safetensors").read_bytes() == whole


def test_quantization_config_names_every_module_that_differs(tmp_path: Path) -> None:
    """As in SmolLM2's Q4_1 file: Q8_0 embedding, Q4_1 elsewhere; plus one F16 matrix."""
    tiny = write_tiny_gguf(tmp_path / "m.gguf", weight_type=T.Q4_1, embed_type=T.Q8_0)
    from exod.models.gguf.reader import open_gguf

    model = open_gguf(tiny.path)
    plans = tensors.plan_tensors(model.tensors, {**tiny.config}, "m.gguf")
    dense = next(p for p in plans if p.name == "model.layers.1.mlp.up_proj.weight")
    plans = [
        tensors.TensorPlan(dense.source, p.name, 0, True, 0) if p is dense else p for p in plans
    ]
    assert quantization_config(plans) == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
        "model.layers.1.mlp.up_proj": False,
    }
    assert quantization_config([p for p in plans if p.bits == 0]) is None
