"""Opening GGUF files and split sets: plain metadata, tensor extents, and a precise refusal for
each way a file can be wrong."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from exod.errors import ExoError
from exod.models.gguf.reader import open_gguf, read_rows
from tests.gguf_files import TinyGGUF, gguf_name, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    return write_tiny_gguf(tmp_path_factory.mktemp("reader") / "m.gguf", weight_type=T.Q8_0)


def _refusal(path: Path) -> ExoError:
    with pytest.raises(ExoError) as caught:
        open_gguf(path)
    return caught.value


def _variant(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "v.gguf"
    path.write_bytes(data)
    return path


def test_metadata_comes_as_plain_values(tiny: TinyGGUF) -> None:
    model = open_gguf(tiny.path)
    assert model.arch == "llama"
    assert model.meta["llama.block_count"] == 2
    assert isinstance(model.meta["llama.rope.freq_base"], float)
    assert model.meta["tokenizer.ggml.add_bos_token"] is False
    tokens = model.meta["tokenizer.ggml.tokens"]
    assert (
        isinstance(tokens, list) and len(tokens) == 512 and all(isinstance(t, str) for t in tokens)
    )
    assert not any(k.startswith("GGUF.") for k in model.meta)


def test_tensors_and_their_rows(tiny: TinyGGUF) -> None:
    model = open_gguf(tiny.path)
    assert set(model.tensors) == set(tiny.stored)
    embed = model.tensors["token_embd.weight"]
    assert embed.type == T.Q8_0
    assert embed.shape == (512, 64)  # numpy order: rows (vocabulary), then values
    assert embed.row_bytes == 2 * 34
    _, raw = tiny.stored["token_embd.weight"]
    assert np.array_equal(read_rows(embed, 3, 7), raw[3:7])
    norm = model.tensors[gguf_name("model.norm.weight")]
    assert norm.rows == 1
    assert read_rows(norm, 0, 1).view("<f4").tolist() == [[1.0] * 64]


def test_a_missing_file(tmp_path: Path) -> None:
    error = _refusal(tmp_path / "nope.gguf")
    assert error.reason == "model_not_found"
    assert error.message == f"no file at {tmp_path / 'nope.gguf'}: give the path of a .gguf file"


def test_a_directory(tmp_path: Path) -> None:
    error = _refusal(tmp_path)
    assert error.reason == "model_unreadable"
    assert "is a directory, not a GGUF file" in error.message


def test_a_fifo_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert "not a regular file" in _refusal(fifo).message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file(tiny: TinyGGUF, tmp_path: Path) -> None:
    path = _variant(tmp_path, tiny.path.read_bytes())
    path.chmod(0)
    assert _refusal(path).reason == "permission_denied"


def test_not_gguf(tmp_path: Path) -> None:
    error = _refusal(_variant(tmp_path, b'{"safetensors": "header"}' + b"\0" * 64))
    assert error.reason == "model_unreadable"
    assert "is not a GGUF file (it starts with b'{\"sa'" in error.message
    error = _refusal(_variant(tmp_path, b"GGUF"))
    assert error.reason == "weights_corrupt"
    assert "too short to be a GGUF file (4 bytes)" in error.message


def test_truncated_names_the_first_tensor_cut(tiny: TinyGGUF, tmp_path: Path) -> None:
    data = tiny.path.read_bytes()
    error = _refusal(_variant(tmp_path, data[: len(data) * 6 // 10]))
    assert error.reason == "weights_corrupt"
    assert "truncated: tensor 'blk." in error.message
    assert error.message.endswith("the file is damaged or incomplete: copy it again")


@pytest.mark.parametrize("where", ["metadata count", "tensor count", "string length", "noise"])
def test_a_garbled_header(tiny: TinyGGUF, tmp_path: Path, where: str) -> None:
    data = tiny.path.read_bytes()
    huge = struct.pack("<Q", 1 << 40)
    if where == "metadata count":
        data = data[:16] + huge + data[24:]
    elif where == "tensor count":
        data = data[:8] + huge + data[16:]
    elif where == "string length":
        at = data.find(b"general.name") + len("general.name") + 4  # key, then value type
        data = data[:at] + huge + data[at + 8 :]
    else:
        noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        data = data[:8] + noise + data[4008:]
    error = _refusal(_variant(tmp_path, data))
    assert error.reason == "weights_corrupt"
    assert "header is garbled or cut short" in error.message


def test_a_header_cut_short(tiny: TinyGGUF, tmp_path: Path) -> None:
    error = _refusal(_variant(tmp_path, tiny.path.read_bytes()[:300]))
    assert error.reason == "weights_corrupt"


def test_an_unknown_version(tiny: TinyGGUF, tmp_path: Path) -> None:
    data = tiny.path.read_bytes()
    error = _refusal(_variant(tmp_path, data[:4] + struct.pack("<I", 7) + data[8:]))
    assert error.reason == "model_unsupported"
    assert "GGUF version 7" in error.message
    big_endian = data[:4] + struct.pack(">I", 3) + data[8:]
    assert "big-endian" in _refusal(_variant(tmp_path, big_endian)).message


def test_an_unknown_tensor_type(tiny: TinyGGUF, tmp_path: Path) -> None:
    data = tiny.path.read_bytes()
    name = b"token_embd.weight"
    at = data.find(name) + len(name)
    (n_dims,) = struct.unpack("<I", data[at : at + 4])
    at += 4 + 8 * n_dims
    error = _refusal(_variant(tmp_path, data[:at] + struct.pack("<I", 99) + data[at + 4 :]))
    assert error.reason == "model_unsupported"
    assert "tensor 'token_embd.weight' has type 99" in error.message


def test_a_split_set_opens_from_any_part(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "m.gguf", split_max_tensors=8)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) == 3 and tiny.path == parts[0]
    whole = write_tiny_gguf(tmp_path / "whole.gguf")
    single = open_gguf(whole.path)
    for part in parts:
        model = open_gguf(part)
        assert model.paths == tuple(parts)
        assert model.meta == {**single.meta}
        assert set(model.tensors) == set(single.tensors)
        assert {t.path for t in model.tensors.values()} == set(parts)
        for name, tensor in model.tensors.items():
            rows = read_rows(tensor, 0, tensor.rows)
            assert np.array_equal(rows, read_rows(single.tensors[name], 0, tensor.rows))


def test_a_split_set_missing_a_part(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "m.gguf", split_max_tensors=8)
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    error = _refusal(tiny.path)
    assert error.reason == "model_not_found"
    assert error.message == (
        "part 2 of 3 of the split GGUF m-00001-of-00003.gguf is missing "
        "(m-00002-of-00003.gguf): put all the parts in one folder"
    )


def test_a_renamed_part(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "m.gguf", split_max_tensors=8)
    renamed = tiny.path.rename(tmp_path / "first.gguf")
    error = _refusal(renamed)
    assert error.reason == "model_unreadable"
    assert "one part of a GGUF split into 3 files" in error.message


def test_parts_of_different_sets(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "a.gguf", split_max_tensors=8)
    write_tiny_gguf(tmp_path / "b.gguf", split_max_tensors=8)
    (tmp_path / "a-00002-of-00003.gguf").unlink()
    (tmp_path / "b-00003-of-00003.gguf").rename(tmp_path / "a-00002-of-00003.gguf")
    error = _refusal(tmp_path / "a-00001-of-00003.gguf")
    assert error.reason == "weights_corrupt"
    assert "says it is part 3 of 3, not part 2 of 3" in error.message
