"""Open a GGUF file, or a split set (`NAME-00001-of-00003.gguf`), and check it before any use.

The header is parsed by gguf's GGUFReader over a memory map, so only the pages it reads are
touched; tensor data is never read here (read_rows reads a range of rows when asked). The file
is checked as it is parsed: every read must lie inside the file (a garbled count would otherwise
make the parser loop over nothing for a very long time), every tensor's data must end inside the
file (a truncated download names the first tensor it cuts), and every tensor type must be known.
Metadata comes out as plain Python values.
"""

from __future__ import annotations

import math
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField

from exod.errors import ExoError

MetaScalar = str | int | float | bool
MetaValue = MetaScalar | list[MetaScalar]

# The fixed part of a GGUF header: magic, version, tensor count, metadata count.
HEADER_BYTES = 24
MAGIC = b"GGUF"
VERSIONS = (2, 3)
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class Tensor:
    """Where one tensor's data lies, and how it is laid out.

    shape is in numpy's (row-major) order, the reverse of GGUF's: a weight matrix is (out, in),
    and its rows (the last axis) are what the quantized types split into blocks.
    """

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    path: Path
    offset: int

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        return self.n_bytes // self.rows if self.rows else 0


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF model: its files (several for a split set), metadata and tensors in file order."""

    paths: tuple[Path, ...]
    meta: dict[str, MetaValue]
    tensors: dict[str, Tensor]

    @property
    def arch(self) -> str:
        value = self.meta.get("general.architecture")
        return value if isinstance(value, str) else ""

    @property
    def data_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())


class _PastEnd(Exception):
    """A read that would go past the end of the file: the header is cut or garbled."""


class _TensorPastEnd(Exception):
    def __init__(self, name: str, end: int, size: int) -> None:
        super().__init__(name)
        self.name, self.end, self.size = name, end, size


class _UnknownType(Exception):
    def __init__(self, name: str, raw: int) -> None:
        super().__init__(name)
        self.name, self.raw = name, raw


class _CheckedReader(GGUFReader):
    """GGUFReader that refuses to read past the end of the file, names a cut tensor, and holds
    its header in plain arrays.

    gguf's own _get makes each value (every token and merge is two) a numpy.memmap view of a
    view: SmolLM2's 49k-token vocabulary then takes 160 MB, a 150k one half a gigabyte. One
    plain array over the same mapped bytes takes a fifth of that. Big-endian files are refused
    before this reads them, so no value needs swapping on a little-endian machine.
    """

    def _get(
        self,
        offset: int,
        dtype: npt.DTypeLike,
        count: int = 1,
        override_order: Literal["I", "S", "<"] | None = None,
    ) -> npt.NDArray[Any]:
        count = int(count)
        kind = np.dtype(dtype)
        end = int(offset) + kind.itemsize * count
        if offset < 0 or count < 0 or end > len(self.data):
            raise _PastEnd
        if self.byte_order != "I" or sys.byteorder != "little":
            return super()._get(offset, dtype, count, override_order)
        flat = self.__dict__.get("_flat")
        if flat is None:
            flat = self.__dict__["_flat"] = self.data.view(np.ndarray)
        return np.frombuffer(flat, dtype=kind, count=count, offset=int(offset))

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        # parts: name length, name, dimension count, dimensions, type, offset (gguf's layout).
        for field in fields:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            raw = int(raw_type[0])
            try:
                ggml_type = GGMLQuantizationType(raw)
            except ValueError:
                raise _UnknownType(name, raw) from None
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            n_bytes = math.prod(int(d) for d in dims) * type_size // block
            end = start_offs + int(offset[0]) + n_bytes
            if end > len(self.data):
                raise _TensorPastEnd(name, end, len(self.data))
        super()._build_tensors(start_offs, fields)


def open_gguf(path: Path) -> GGUFFile:
    """The GGUF model at path (a single file or any part of a split set), checked.

    Raises ExoError: model_not_found (no such file, or a part of the set missing),
    permission_denied, model_unreadable (not a regular file), weights_corrupt (not GGUF, garbled
    or truncated), model_unsupported (a GGUF version or tensor type this cannot read).
    """
    match = SPLIT_NAME.match(path.name)
    if match is None:
        single = _open_one(path)
        count = single.meta.get("split.count")
        if isinstance(count, int) and count > 1:
            raise ExoError(
                "model_unreadable",
                f"{path} is one part of a GGUF split into {count} files, but its name lacks the "
                "-0000N-of-0000M.gguf ending that finds the others: restore the original names",
            )
        return single
    count = int(match["count"])
    parts = [
        path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]
    for i, part in enumerate(parts, 1):
        if not os.path.lexists(part):
            raise ExoError(
                "model_not_found",
                f"part {i} of {count} of the split GGUF {path.name} is missing ({part.name}): "
                "put all the parts in one folder",
            )
    return _join([_open_one(p) for p in parts])


def _join(parts: list[GGUFFile]) -> GGUFFile:
    """One model from the parts of a split set; the first part holds the metadata."""
    count = len(parts)
    tensors: dict[str, Tensor] = {}
    for i, part in enumerate(parts):
        no, of = part.meta.get("split.no"), part.meta.get("split.count")
        if no != i or of != count:
            raise ExoError(
                "weights_corrupt",
                f"{part.paths[0]} says it is part {_human_no(no)} of {of}, not part {i + 1} of "
                f"{count}: the parts come from different files; copy them again",
            )
        for name, tensor in part.tensors.items():
            if name in tensors:
                raise _corrupt(part.paths[0], f"tensor {name!r} is in more than one part")
            tensors[name] = tensor
    expected = parts[0].meta.get("split.tensors.count")
    if isinstance(expected, int) and expected != len(tensors):
        raise _corrupt(
            parts[0].paths[0], f"the parts hold {len(tensors)} tensors, the set says {expected}"
        )
    meta = {k: v for k, v in parts[0].meta.items() if not k.startswith("split.")}
    return GGUFFile(paths=tuple(p.paths[0] for p in parts), meta=meta, tensors=tensors)


def _human_no(no: MetaValue | None) -> str:
    return str(no + 1) if isinstance(no, int) and not isinstance(no, bool) else "?"


def _open_one(path: Path) -> GGUFFile:
    size = _check_file(path)
    try:
        with path.open("rb") as f:
            head = f.read(HEADER_BYTES)
    except PermissionError:
        raise _permission(path) from None
    except OSError as e:
        raise ExoError("model_unreadable", f"cannot read {path}: {_one_line(e)}") from None
    if len(head) < HEADER_BYTES or head[:4] != MAGIC:
        raise ExoError(
            "model_unreadable",
            f"{path} is not a GGUF file (it starts with {head[:4]!r}, a GGUF file with "
            f"{MAGIC!r}): give the path of a .gguf file",
        )
    version = int.from_bytes(head[4:8], "little")
    if version not in VERSIONS:
        if version & 0xFFFF == 0:
            raise ExoError(
                "model_unsupported",
                f"{path} is a big-endian GGUF file, which cannot be converted: use the "
                "little-endian file that is usually published beside it",
            )
        raise ExoError(
            "model_unsupported",
            f"{path} is GGUF version {version}; versions {VERSIONS[0]} and {VERSIONS[-1]} can be "
            "read: re-save it with a current llama.cpp, or upgrade exod",
        )
    try:
        reader = _CheckedReader(path)
    except _PastEnd:
        raise _corrupt(
            path, f"its header is garbled or cut short (it runs past the end, {size} bytes)"
        ) from None
    except _TensorPastEnd as e:
        raise _corrupt(
            path,
            f"truncated: tensor {e.name!r} ends at byte {e.end} but the file has {e.size} bytes",
        ) from None
    except _UnknownType as e:
        raise ExoError(
            "model_unsupported",
            f"{path}: tensor {e.name!r} has type {e.raw}, which the installed gguf package does "
            "not know: upgrade gguf, or use a file quantized with a common type (Q4_K_M, Q8_0)",
        ) from None
    except PermissionError:
        raise _permission(path) from None
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as e:
        raise _corrupt(path, f"garbled GGUF header ({_one_line(e)})") from None
    except OSError as e:
        raise ExoError("model_unreadable", f"cannot read {path}: {_one_line(e)}") from None
    try:
        meta = {k: _plain(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except (ValueError, IndexError) as e:  # UnicodeDecodeError included
        raise _corrupt(path, f"garbled metadata ({_one_line(e)})") from None
    tensors = {
        t.name: Tensor(
            name=t.name,
            type=t.tensor_type,
            shape=tuple(int(d) for d in reversed(t.shape.tolist())),
            n_bytes=int(t.n_bytes),
            path=path,
            offset=int(t.data_offset),
        )
        for t in reader.tensors
    }
    return GGUFFile(paths=(path,), meta=meta, tensors=tensors)


def _check_file(path: Path) -> int:
    """The size of the regular file at path; ExoError when there is none (stat only)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ExoError(
            "model_not_found", f"no file at {path}: give the path of a .gguf file"
        ) from None
    except PermissionError:
        raise _permission(path) from None
    except OSError as e:
        raise ExoError("model_unreadable", f"cannot read {path}: {_one_line(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ExoError(
            "model_unreadable", f"{path} is {what}, not a GGUF file: give the path of a .gguf file"
        )
    if st.st_size < HEADER_BYTES:
        raise _corrupt(path, f"too short to be a GGUF file ({st.st_size} bytes)")
    return st.st_size


def _plain(field: ReaderField) -> MetaValue:
    """A metadata value as plain Python: str, int, float, bool, or a flat list of those."""
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        if not isinstance(value, list):
            raise ValueError(f"array {field.name!r} did not read as a list")
        return [_scalar(v) for v in value]
    return _scalar(value)


def _scalar(value: object) -> MetaScalar:
    if isinstance(value, str | int | float | bool):
        return value
    raise ValueError(f"unexpected metadata value {type(value).__name__}")


def read_rows(tensor: Tensor, start: int, stop: int) -> npt.NDArray[np.uint8]:
    """Rows [start, stop) of the tensor's raw data, as a (stop - start, row_bytes) uint8 array.

    A plain read, not the memory map: the pages read stay in the page cache but not in this
    process's resident memory, so converting a file many times the size of memory is fine.
    """
    length = (stop - start) * tensor.row_bytes
    try:
        fd = os.open(tensor.path, os.O_RDONLY)
        try:
            data = _pread_all(fd, length, tensor.offset + start * tensor.row_bytes)
        finally:
            os.close(fd)
    except OSError as e:
        raise ExoError("model_unreadable", f"cannot read {tensor.path}: {_one_line(e)}") from None
    if len(data) != length:
        raise _corrupt(tensor.path, f"truncated while reading tensor {tensor.name!r}")
    return np.frombuffer(data, dtype=np.uint8).reshape(stop - start, tensor.row_bytes)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 30), offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _corrupt(path: Path, what: str) -> ExoError:
    return ExoError(
        "weights_corrupt", f"{path}: {what}; the file is damaged or incomplete: copy it again"
    )


def _permission(path: Path) -> ExoError:
    return ExoError(
        "permission_denied",
        f"cannot read {path}: permission denied; make it readable by the user exod runs as",
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
