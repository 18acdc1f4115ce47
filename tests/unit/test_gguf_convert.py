"""The whole conversion: refusals before anything is written, the disk-room estimate, atomic
results (no directory and no staging left by a failure or an interrupt), progress, shards, and
the content hash."""

from __future__ import annotations

import errno
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from exod.errors import ExoError
from exod.models.gguf import convert as convert_module
from exod.models.gguf.config import hf_config
from exod.models.gguf.convert import (
    DISK_RESERVE,
    Progress,
    check_room,
    convert,
    layout_shards,
    leftovers,
)
from exod.models.gguf.reader import open_gguf
from exod.models.gguf.tensors import plan_tensors
from exod.models.inspect import content_hash, inspect_model
from tests.gguf_files import TinyGGUF, add_value, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    return write_tiny_gguf(tmp_path_factory.mktemp("convert") / "m.gguf", weight_type=T.Q4_1)


def _refusal(src: Path, dest: Path, **kwargs: object) -> ExoError:
    with pytest.raises(ExoError) as caught:
        convert(src, dest, **kwargs)  # type: ignore[arg-type]  # keyword arguments under test
    assert not dest.exists()
    assert leftovers(dest) == []
    return caught.value


def test_a_model_that_exod_accepts(tiny: TinyGGUF, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    digest = convert(tiny.path, dest)
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    files = inspect_model(dest)
    assert files.model_type == "llama"
    assert files.has_chat_template
    assert digest == content_hash(dest)
    assert leftovers(dest) == []


def test_progress_counts_every_tensor_and_byte(tiny: TinyGGUF, tmp_path: Path) -> None:
    seen: list[Progress] = []
    convert(tiny.path, tmp_path / "out", progress=seen.append)
    total = open_gguf(tiny.path).data_bytes
    assert seen[-1] == Progress(20, 20, total, total)
    assert [p.bytes_done for p in seen] == sorted(p.bytes_done for p in seen)
    assert all(p.bytes_total == total and p.tensors_total == 20 for p in seen)


def test_an_existing_destination_is_left_alone(tiny: TinyGGUF, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(ExoError) as caught:
        convert(tiny.path, dest)
    assert caught.value.reason == "invalid_argument"
    assert caught.value.message == (
        f"{dest} already exists: choose another destination, or remove it first"
    )
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def test_no_room_is_refused_before_writing(tiny: TinyGGUF, tmp_path: Path) -> None:
    dest = tmp_path / "models" / "out"
    error = _refusal(tiny.path, dest, free=lambda _: 1000)
    assert error.reason == "disk_full"
    assert error.message.startswith("not enough disk space to import the model: it needs ")
    assert f"in {tmp_path}, where 1000 B is free; free some space and try again" in error.message
    assert not dest.parent.exists()


def test_the_estimate_is_what_is_written(
    tiny: TinyGGUF, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_room is asked for exactly the bytes the model directory ends up holding."""
    asked: list[int] = []

    def spy(folder: Path, needed: int, free: Callable[[Path], int]) -> None:
        asked.append(needed)

    monkeypatch.setattr(convert_module, "check_room", spy)
    dest = tmp_path / "out"
    convert(tiny.path, dest, shard_bytes=20_000)
    written = sum(f.stat().st_size for f in dest.iterdir())
    assert asked == [written]


def test_check_room_keeps_a_reserve(tmp_path: Path) -> None:
    check_room(tmp_path, 10, lambda _: 10 + DISK_RESERVE)
    with pytest.raises(ExoError) as caught:
        check_room(tmp_path, 11, lambda _: 10 + DISK_RESERVE)
    assert caught.value.reason == "disk_full"
    # A folder not made yet is measured on its nearest existing parent.
    asked: list[Path] = []

    def free(path: Path) -> int:
        asked.append(path)
        return DISK_RESERVE + 1

    check_room(tmp_path / "a" / "b", 1, free)
    assert asked == [tmp_path]


def test_a_disk_that_fills_up_while_writing(
    tiny: TinyGGUF, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = os.pwrite

    def fill_up(fd: int, data: bytes, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fill_up)
    error = _refusal(tiny.path, tmp_path / "out")
    assert error.reason == "disk_full"
    assert "the disk filled up while writing" in error.message
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_leaves_nothing(tiny: TinyGGUF, tmp_path: Path) -> None:
    def interrupt(p: Progress) -> None:
        if p.tensors_done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny.path, tmp_path / "out", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_import_are_found(tmp_path: Path) -> None:
    (tmp_path / ".out.importing-0a1b2c3d").mkdir()
    (tmp_path / ".other.importing-0a1b2c3d").mkdir()
    assert leftovers(tmp_path / "out") == [tmp_path / ".out.importing-0a1b2c3d"]


def test_shards_and_their_index(tiny: TinyGGUF, tmp_path: Path) -> None:
    digest = convert(tiny.path, tmp_path / "out", shard_bytes=20_000)
    names = sorted(p.name for p in (tmp_path / "out").glob("model*"))
    count = len(names) - 1
    assert count > 2
    assert names[-1] == "model.safetensors.index.json"
    assert names[0] == f"model-00001-of-{count:05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names[:-1])
    assert digest == content_hash(tmp_path / "out")
    inspect_model(tmp_path / "out")


def test_shard_layout(tiny: TinyGGUF) -> None:
    model = open_gguf(tiny.path)
    shapes = {name: t.shape for name, t in model.tensors.items()}
    config = hf_config(model.meta, shapes, "m.gguf")
    outputs = [o for p in plan_tensors(model.tensors, config, "m.gguf") for o in p.outputs]
    (shard,) = layout_shards(outputs, 1 << 30)
    assert shard.file == "model.safetensors"
    length = int.from_bytes(shard.header[:8], "little")
    assert length % 8 == 0 and len(shard.header) == 8 + length
    header = json.loads(shard.header[8:])
    assert header["__metadata__"] == {"format": "mlx"}
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no holes
    assert shard.size == len(shard.header) + spans[-1][1]


def _write_variant(path: Path, arch: str, kind: int, tiny: TinyGGUF) -> Path:
    """A GGUF with tiny's metadata under another architecture, one tensor of a raw type."""
    model = open_gguf(tiny.path)
    writer = GGUFWriter(path, arch)
    for name, value in model.meta.items():
        if name == "general.architecture":
            continue
        key = name.replace("llama.", f"{arch}.")
        add_value(writer, key, value)
    for name, (stored_kind, raw) in tiny.stored.items():
        if name == "token_embd.weight":
            size = {int(T.Q8_1): 40}.get(kind, 34)
            blocks = np.zeros((512, 64 // 32 * size), dtype=np.uint8)
            writer.add_tensor(name, blocks, raw_dtype=T(kind))
        elif stored_kind in (T.F32, T.F16):
            writer.add_tensor(name, raw)
        else:
            writer.add_tensor(name, raw, raw_dtype=stored_kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unknown_architecture(tiny: TinyGGUF, tmp_path: Path) -> None:
    src = _write_variant(tmp_path / "g.gguf", "gpt2", int(T.Q8_0), tiny)
    error = _refusal(src, tmp_path / "out")
    assert error.reason == "model_unsupported"
    assert "g.gguf is a 'gpt2' model, which cannot be converted" in error.message


def test_an_unsupported_tensor_type(tiny: TinyGGUF, tmp_path: Path) -> None:
    src = _write_variant(tmp_path / "q.gguf", "llama", int(T.Q8_1), tiny)
    error = _refusal(src, tmp_path / "out")
    assert error.reason == "model_unsupported"
    assert "tensor 'token_embd.weight' is of type Q8_1, which cannot be converted" in error.message


def test_a_missing_tokenizer(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(
        tmp_path / "m.gguf", drop=("tokenizer.ggml.tokens", "tokenizer.ggml.model")
    )
    error = _refusal(tiny.path, tmp_path / "out")
    assert error.reason == "model_unsupported"
    assert "has no tokenizer" in error.message


def test_a_missing_tensor(tiny: TinyGGUF, tmp_path: Path) -> None:
    data = tiny.path.read_bytes()
    # Rename one tensor so that the model lacks it (and holds an unknown one).
    src = tmp_path / "m.gguf"
    src.write_bytes(data.replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight"))
    error = _refusal(src, tmp_path / "out")
    assert error.reason == "model_unsupported"
    assert "tensor 'blk.1.ffn_xx.weight', which mlx-lm's llama has no place for" in error.message
