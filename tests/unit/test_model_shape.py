"""shape: a model's layers and what each weighs, from its config and safetensors headers; and
whether mlx-lm can split it, asked of mlx-lm in a subprocess.

Checked on real generated models, single-file and indexed (an indexed copy made here), against
the tensors' bytes as the files hold them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from exod.errors import ExoError
from exod.models.demo import Arch, parameter_shapes
from exod.models.pipeline_check import PipelineCheck
from exod.models.shape import Shape, num_layers, read_shape, shape_of
from tests import models


def tensor_bytes(path: Path) -> dict[str, int]:
    """Each tensor's bytes in the safetensors files of `path`, from the files' own headers."""
    found = {}
    for file in sorted(path.glob("*.safetensors")):
        data = file.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                found[name] = end - begin
    return found


def indexed_copy(src: Path, shards: int = 3) -> Path:
    """A copy of `src` with its weights in `shards` files and a model.safetensors.index.json,
    as large models come from the Hugging Face hub."""
    dest = models.copy_model(src)
    tensors = load_file(dest / "model.safetensors")
    (dest / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(dest / file), metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shape_of_a_generated_model(arch: Arch) -> None:
    path = models.demo_model(arch, num_layers=3)
    shape = read_shape(path)
    config = json.loads((path / "config.json").read_text())
    expected = {name: 4 * _count(dims) for name, dims in parameter_shapes(config).items()}  # f32
    assert tensor_bytes(path) == expected
    assert shape.model_type == arch
    assert shape.layers == 3
    per_layer = sum(b for n, b in expected.items() if n.startswith("model.layers.0."))
    assert shape.layer_bytes == (per_layer,) * 3
    assert (
        shape.shared_bytes == expected["model.embed_tokens.weight"] + expected["model.norm.weight"]
    )
    assert shape.total_bytes == sum(expected.values())
    assert shape.bytes_of(1, 2) == 2 * per_layer
    assert shape.pipeline is False  # not asked yet


def test_an_indexed_model_has_the_same_shape() -> None:
    src = models.demo_model("qwen2", num_layers=4)
    copy = indexed_copy(src)
    assert not (copy / "model.safetensors").exists()
    assert len(list(copy.glob("model-*.safetensors"))) == 3
    assert read_shape(copy) == read_shape(src)
    assert read_shape(copy).total_bytes == sum(tensor_bytes(copy).values())


def test_a_stale_single_file_beside_shards_counts_each_tensor_once() -> None:
    src = models.demo_model("qwen2", num_layers=4)
    copy = indexed_copy(src)
    shutil.copy(src / "model.safetensors", copy / "model.safetensors")
    assert read_shape(copy) == read_shape(src)


def test_a_garbled_tensor_entry_is_corrupt_weights() -> None:
    path = models.copy_model()
    data = (path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["model.norm.weight"]["dtype"] = "X32"
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length  # padded with blanks: the data stays where it was
    (path / "model.safetensors").write_bytes(data[:8] + raw.ljust(length) + data[8 + length :])
    with pytest.raises(ExoError) as raised:
        read_shape(path)
    assert raised.value.reason == "weights_corrupt"
    assert "model.norm.weight" in raised.value.message


def test_tensor_names_map_to_layers_and_the_rest_is_shared() -> None:
    tensors = {
        "model.embed_tokens.weight": 100,
        "model.layers.0.mlp.up_proj.weight": 10,
        "model.layers.0.input_layernorm.weight": 1,
        "language_model.model.layers.1.self_attn.q_proj.weight": 20,
        "model.language_model.layers.2.mlp.down_proj.weight": 30,
        "model.norm.weight": 5,
        "lm_head.weight": 100,
        "model.layers.3.mtp.weight": 1000,  # beyond the config's 3 layers: mlx-lm drops it
        "model.layersX.4.weight": 7,  # not a layer
    }
    assert shape_of("qwen2", 3, tensors) == Shape("qwen2", (11, 20, 30), 212)
    # Without a count in the config, as many as the tensors name.
    assert shape_of("qwen2", None, tensors).layer_bytes == (11, 20, 30, 1000)
    # A layer the config counts but no tensor names weighs nothing.
    assert shape_of("qwen2", 4, {"model.layers.0.w": 8}).layer_bytes == (8, 0, 0, 0)


def test_a_config_of_no_layers_with_layer_weights_is_refused() -> None:
    with pytest.raises(ExoError) as raised:
        shape_of("qwen2", 0, {"model.layers.0.w": 8})
    assert raised.value.reason == "model_unreadable"


def test_num_layers_from_the_config_or_its_text_config() -> None:
    assert num_layers({"num_hidden_layers": 28}) == 28
    assert num_layers({"text_config": {"num_hidden_layers": 48}}) == 48
    assert num_layers({}) is None
    assert num_layers({"num_hidden_layers": True}) is None
    assert num_layers({"num_hidden_layers": "28"}) is None


def _count(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# --- whether mlx-lm can split it ----------------------------------------------------------------


@pytest.mark.parametrize(("arch", "pipeline"), [("qwen2", True), ("llama", False)])
def test_pipeline_check_asks_mlx_lm(arch: Arch, pipeline: bool) -> None:
    # mlx-lm 0.32: qwen2's inner model has `pipeline`, llama's has not.
    path = models.demo_model(arch)
    proc = subprocess.run(
        [sys.executable, "-m", "exod.models.pipeline_check", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"model_type": arch, "pipeline": pipeline}


def test_pipeline_check_of_a_config_mlx_lm_cannot_build() -> None:
    path = models.copy_model()
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "exod.models.pipeline_check", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    answer = json.loads(proc.stdout)
    assert proc.returncode == 0 and answer["pipeline"] is False and "error" in answer


def test_pipeline_check_without_a_model_says_so() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "exod.models.pipeline_check", "/nonexistent"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 65 and proc.stdout == ""
    assert "config.json" in proc.stderr


def test_exod_asks_once_per_model_content() -> None:
    check = PipelineCheck()
    asked: list[Path] = []
    real = check._ask

    async def counting(path: Path) -> bool:
        asked.append(path)
        return await real(path)

    check._ask = counting  # type: ignore[method-assign]  # counting the subprocesses
    qwen2, llama = models.demo_model("qwen2"), models.demo_model("llama")

    async def ask() -> list[bool]:
        return [
            await check.supports(qwen2, "h1"),
            await check.supports(qwen2, "h1"),
            await check.supports(llama, "h2"),
            await check.supports(qwen2, "h3"),  # its files changed: asked again
        ]

    assert asyncio.run(ask()) == [True, True, False, True]
    assert asked == [qwen2, llama, qwen2]


def test_exod_reports_a_check_that_cannot_run() -> None:
    check = PipelineCheck()
    with pytest.raises(ExoError) as raised:
        asyncio.run(check.supports(Path("/nonexistent"), "h"))
    assert raised.value.reason == "internal"
    assert "could not ask mlx-lm whether /nonexistent can be split (exit 65" in raised.value.message
