"""Convert a GGUF file (or split set) into an MLX model directory, atomically and in bounded memory.

Everything that can refuse the file is done before anything is written: the header and every
tensor's extent (reader), the architecture and sizes (config), every tensor's name, shape and
type (tensors), the tokenizer (tokenizer), and the room on the disk for the exact size of the
result. Then the files are written into a staging directory beside the destination, each
safetensors shard laid out in full first (its header holds every offset) and filled one chunk of
rows at a time with positioned writes, so memory stays near one chunk's worth whatever the
model's size. The staging directory is renamed into place at the end: the destination is either
absent or complete. Any failure, or an interrupt, removes the staging directory.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exod.errors import ExoError
from exod.models.gguf.config import hf_config
from exod.models.gguf.reader import GGUFFile, open_gguf, read_rows
from exod.models.gguf.tensors import Output, TensorPlan, plan_tensors, quantization_config
from exod.models.gguf.tokenizer import tokenizer_files
from exod.models.inspect import content_hash

# A shard is closed once it holds this much (a tensor is never split across shards).
SHARD_BYTES = 4 * 1024**3
# Room left free on the disk beyond the model's own size, so that an import never fills it.
DISK_RESERVE = 64 * 1024**2
STAGING_INFIX = ".importing-"


@dataclass(frozen=True)
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_done: int  # bytes of GGUF tensor data converted
    bytes_total: int


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class Shard:
    """One safetensors file: its name, header bytes, and where each entry's data starts."""

    file: str
    header: bytes
    starts: dict[str, int]  # entry name -> absolute offset in the file
    size: int


def free_bytes(path: Path) -> int:
    """Bytes free for this user on the file system holding path."""
    return shutil.disk_usage(path).free


def convert(
    src: Path,
    dest: Path,
    *,
    progress: ProgressFn | None = None,
    free: Callable[[Path], int] = free_bytes,
    shard_bytes: int = SHARD_BYTES,
) -> str:
    """Convert the GGUF at src into an MLX model directory at dest; return its content hash.

    dest must not exist; its parent is created if needed. Raises ExoError (see the module doc
    and reader.open_gguf): invalid_argument when dest exists, disk_full when the disk lacks
    room (before writing) or fills up (while writing), permission_denied when dest's folder is
    not writable.
    """
    if os.path.lexists(dest):
        raise ExoError(
            "invalid_argument",
            f"{dest} already exists: choose another destination, or remove it first",
        )
    model = open_gguf(src)
    source = src.name
    config = _config(model, source)
    plans = plan_tensors(model.tensors, config, source)
    quant = quantization_config(plans)
    if quant is not None:
        config["quantization"] = quant
        config["quantization_config"] = quant
    small = {"config.json": _json_bytes(config), **tokenizer_files(model.meta)}
    shards = layout_shards([o for p in plans for o in p.outputs], shard_bytes)
    if len(shards) > 1:
        small["model.safetensors.index.json"] = _index(shards)
    needed = sum(s.size for s in shards) + sum(len(b) for b in small.values())
    check_room(dest.parent, needed, free)

    staging = _make_staging(dest)
    try:
        _write_weights(staging, shards, plans, progress)
        for name, data in small.items():
            _write_file(staging / name, data)
        _fsync_dir(staging)
        digest = content_hash(staging)
        try:
            staging.rename(dest)
        except OSError as e:
            raise ExoError(
                "invalid_argument",
                f"{dest} appeared while converting ({_one_line(e)}): choose another "
                "destination, or remove it first",
            ) from None
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return digest


def leftovers(dest: Path) -> list[Path]:
    """Staging directories of imports into dest that were killed before they could clean up."""
    if not dest.parent.is_dir():
        return []
    return sorted(dest.parent.glob(f".{dest.name}{STAGING_INFIX}*"))


def _config(model: GGUFFile, source: str) -> dict[str, object]:
    shapes = {name: t.shape for name, t in model.tensors.items()}
    factors = None
    rope = model.tensors.get("rope_freqs.weight")
    if rope is not None and rope.type.name == "F32" and len(rope.shape) == 1:
        factors = read_rows(rope, 0, 1).view("<f4").reshape(-1).tolist()
    elif rope is not None:
        raise ExoError(
            "model_unsupported",
            f"{source}: its rope_freqs tensor is {rope.type.name} of shape {rope.shape}, not "
            "the float32 vector llama.cpp writes: it cannot be converted",
        )
    return hf_config(model.meta, shapes, source, factors)


def check_room(folder: Path, needed: int, free: Callable[[Path], int]) -> None:
    """ExoError disk_full unless the disk holding folder has room for needed bytes, and some."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the folder is made later; its disk is its nearest existing parent
    try:
        available = free(probe)
    except OSError as e:
        raise ExoError(
            "disk_full", f"cannot tell the free space in {probe}: {_one_line(e)}"
        ) from None
    if available < needed + DISK_RESERVE:
        raise ExoError(
            "disk_full",
            f"not enough disk space to import the model: it needs {_human(needed)} (and "
            f"{_human(DISK_RESERVE)} to spare) in {probe}, where {_human(available)} is free; "
            "free some space and try again",
        )


def layout_shards(outputs: list[Output], shard_bytes: int) -> list[Shard]:
    """Assign entries to safetensors files of about shard_bytes each, and lay each file out."""
    groups: list[list[Output]] = [[]]
    size = 0
    for out in outputs:
        if groups[-1] and size + out.n_bytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(out)
        size += out.n_bytes
    count = len(groups)
    shards = []
    for i, group in enumerate(groups, 1):
        name = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        header_json: dict[str, object] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for out in group:
            header_json[out.name] = {
                "dtype": out.dtype,
                "shape": list(out.shape),
                "data_offsets": [offset, offset + out.n_bytes],
            }
            offset += out.n_bytes
        header = json.dumps(header_json, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
        base = 8 + len(header)
        data_starts: dict[str, int] = {}
        offset = 0
        for out in group:
            data_starts[out.name] = base + offset
            offset += out.n_bytes
        shards.append(
            Shard(
                file=name,
                header=len(header).to_bytes(8, "little") + header,
                starts=data_starts,
                size=base + offset,
            )
        )
    return shards


def _index(shards: list[Shard]) -> bytes:
    weight_map = {name: s.file for s in shards for name in s.starts}
    total = sum(s.size - len(s.header) for s in shards)
    return _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})


def _make_staging(dest: Path) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}{STAGING_INFIX}{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as e:
        raise _write_error(dest.parent, e) from None
    return staging


def _write_weights(
    staging: Path, shards: list[Shard], plans: list[TensorPlan], progress: ProgressFn | None
) -> None:
    where: dict[str, tuple[int, int]] = {}
    fds: list[int] = []
    try:
        for shard in shards:
            path = staging / shard.file
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as e:
                raise _write_error(path, e) from None
            fds.append(fd)
            _pwrite(fd, shard.header, 0, path)
            where.update({name: (fd, start) for name, start in shard.starts.items()})
        total = sum(p.source.n_bytes for p in plans)
        done = 0
        for i, plan in enumerate(plans):

            def chunk_done(n: int, i: int = i, before: int = done) -> None:
                # Within a large tensor too, so that a supervisor sees the import move.
                if progress is not None:
                    progress(Progress(i, len(plans), before + n, total))

            _convert_tensor(plan, where, staging, chunk_done)
            done += plan.source.n_bytes
            if progress is not None:
                progress(Progress(i + 1, len(plans), done, total))
        for fd, shard in zip(fds, shards, strict=True):
            try:
                os.fsync(fd)
            except OSError as e:
                raise _write_error(staging / shard.file, e) from None
    finally:
        for fd in fds:
            os.close(fd)


def _convert_tensor(
    plan: TensorPlan,
    where: dict[str, tuple[int, int]],
    staging: Path,
    chunk_done: Callable[[int], None],
) -> None:
    tensor = plan.source
    step = plan.chunk_rows()
    for start in range(0, tensor.rows, step):
        stop = min(tensor.rows, start + step)
        arrays = plan.convert(read_rows(tensor, start, stop))
        for out, array in zip(plan.outputs, arrays, strict=True):
            fd, base = where[out.name]
            _pwrite(
                fd, np.ascontiguousarray(array).tobytes(), base + start * out.row_bytes, staging
            )
        if stop < tensor.rows:
            chunk_done(stop * tensor.row_bytes)


def _pwrite(fd: int, data: bytes, offset: int, path: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    except OSError as e:
        raise _write_error(path, e) from None


def _write_file(path: Path, data: bytes) -> None:
    try:
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _write_error(path, e) from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # likewise: not every file system syncs a directory
    finally:
        os.close(fd)


def _write_error(path: Path, e: OSError) -> ExoError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExoError(
            "disk_full",
            f"the disk filled up while writing {path}: free some space and import again",
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExoError(
            "permission_denied",
            f"cannot write {path} ({_one_line(e)}): make its folder writable by the user exod "
            "runs as",
        )
    return ExoError("internal", f"cannot write {path}: {_one_line(e)}")


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
