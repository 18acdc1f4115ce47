"""A partial model directory: what one rank of a split model needs, and nothing more.

A rank of mlx-lm's pipeline runs a range of the decoder's layers, and embeds, normalises and
projects on its own: it needs the tensors of its layers, every tensor outside the layers
(embeddings, final norm, lm_head), config.json and the tokenizer. write_partial copies exactly
those out of a full model directory, shard by shard, byte for byte (any dtype, no MLX), so that
a member that lacks the model can be given only its part (and tests can make one).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from exod.models.inspect import (
    safetensors_header,  # the checked header reader every reader of weights here uses
    weight_files,
)
from exod.models.shape import layer_of

INDEX = "model.safetensors.index.json"
# What a rank needs besides weights: mlx-lm's sharded_load's list, without *.py (exod never runs
# a model's own code).
SIDE_FILES = ("*.json", "*.txt", "*.jsonl", "*.jinja", "*.tiktoken", "tokenizer.model")
COPY_CHUNK = 1 << 20
_LEN = struct.Struct("<Q")


def keeps(tensor: str, layers: range) -> bool:
    """Whether a rank that runs `layers` needs this tensor."""
    layer = layer_of(tensor)
    return layer is None or layer in layers


def write_partial(src: Path, dest: Path, layers: range) -> Path:
    """Write to dest (which must not exist) the part of the model in src that runs `layers`.

    Each weights file keeps its name and holds only the tensors kept (a file left with none is
    not written); an index is rewritten to match. The files go to a temporary directory beside
    dest, renamed into place at the end: dest is either absent or complete.
    """
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    shards = weight_files(src)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for pattern in SIDE_FILES:
            for file in src.glob(pattern):
                if file.name != INDEX and file.is_file():
                    shutil.copyfile(file, tmp / file.name)
        kept: dict[str, str] = {}  # tensor -> the file that holds it
        total = 0
        for shard in shards:
            names, size = _write_shard(shard, tmp / shard.name, layers)
            kept.update(dict.fromkeys(names, shard.name))
            total += size
        if (src / INDEX).is_file():
            index = {"metadata": {"total_size": total}, "weight_map": kept}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write_shard(src: Path, dest: Path, layers: range) -> tuple[list[str], int]:
    """Copy the kept tensors of one safetensors file; (their names, their data bytes)."""
    header, header_len, _ = safetensors_header(src)
    data_start = _LEN.size + header_len
    names = [n for n in header if n != "__metadata__" and keeps(n, layers)]
    if not names:
        return [], 0
    # Packed in the order they were, each with its new offsets.
    new_header: dict[str, Any] = {}
    if "__metadata__" in header:
        new_header["__metadata__"] = header["__metadata__"]
    spans: list[tuple[int, int]] = []
    offset = 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        new_header[name] = {**header[name], "data_offsets": [offset, offset + end - begin]}
        spans.append((data_start + begin, end - begin))
        offset += end - begin
    raw = json.dumps(new_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with src.open("rb") as fin, dest.open("wb") as fout:
        fout.write(_LEN.pack(len(raw)) + raw)
        for start, length in spans:
            fin.seek(start)
            _copy(fin, fout, length)
        fout.flush()
        os.fsync(fout.fileno())
    return names, offset


def _copy(fin: BinaryIO, fout: BinaryIO, length: int) -> None:
    while length > 0:
        chunk = fin.read(min(COPY_CHUNK, length))
        if not chunk:
            raise OSError(f"{fin.name} ended {length} bytes early")
        fout.write(chunk)
        length -= len(chunk)
