"""A model directory's manifest: each file's relative path, size and full SHA-256, and the
directory's content key, the SHA-256 of the manifest's canonical text.

The key names a directory by what it holds, so that two nodes that hold the same bytes agree on
it whatever the directory is called (a partial model for one rank, written twice, gets the same
key). Unlike the registry's content hash (exod/models/inspect.py, which samples a weights file's
head and tail), every byte counts here: it is what a member checks the weights it receives
against. Everything but `manifest_of` is pure.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

KEY = re.compile(r"[0-9a-f]{64}")
# Bounds on what a receiver accepts from a header, far above any real model directory (a few
# dozen files, short names) and far below what would strain it.
MAX_FILES = 4096
MAX_PATH = 1024
MAX_NAME = 255
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class ManifestFile:
    path: str  # relative, '/'-separated, checked by check_path
    size: int
    sha256: bytes  # 32 bytes


@dataclass(frozen=True)
class Manifest:
    files: tuple[ManifestFile, ...]  # sorted by path

    @property
    def key(self) -> str:
        return key_of(self.files)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


def canonical_text(files: tuple[ManifestFile, ...] | list[ManifestFile]) -> bytes:
    """One line `<sha256 hex> <size> <path>` per file, sorted by path (paths hold no control
    characters, so a line cannot be forged by a name)."""
    lines = sorted(f"{f.sha256.hex()} {f.size} {f.path}\n" for f in files)
    return "".join(lines).encode()


def key_of(files: tuple[ManifestFile, ...] | list[ManifestFile]) -> str:
    return hashlib.sha256(canonical_text(files)).hexdigest()


def check_path(path: str) -> str | None:
    """Why `path` may not name a file inside a model directory, or None when it may: it must be
    relative, '/'-separated, without '.', '..' or empty parts, control characters or a
    backslash (which another system could read as a separator)."""
    shown = repr(path[:80])
    parts = path.split("/")
    checks = (
        (not path, "an empty path"),
        (len(path) > MAX_PATH, f"a path longer than {MAX_PATH} characters"),
        (path.startswith("/"), f"the absolute path {shown}"),
        (
            "\\" in path or not path.isprintable(),
            f"the path {shown} with a backslash or a control character",
        ),
        (
            any(p in ("", ".", "..") for p in parts),
            f"the path {shown}, which has an empty, '.' or '..' part",
        ),
        (
            any(len(p) > MAX_NAME for p in parts),
            f"the path {shown}, a part of which is longer than {MAX_NAME} characters",
        ),
    )
    return next((why for failed, why in checks if failed), None)


def _check_file(f: ManifestFile) -> str | None:
    why = check_path(f.path)
    if why is not None:
        return f"it names {why}"
    if f.size < 0:
        return f"it gives {f.path!r} a negative size"
    if len(f.sha256) != 32:
        return f"its digest of {f.path!r} is not a SHA-256"
    return None


def check_manifest(key: str, files: list[ManifestFile]) -> str | None:
    """Why a received manifest cannot be taken, or None: a bad key, path, size or digest, a
    path twice, a file that is also a directory of another, too many files, or a key that is
    not the manifest's own."""
    if not KEY.fullmatch(key):
        return "its key is not 64 lowercase hex digits"
    if len(files) > MAX_FILES:
        return f"it lists {len(files)} files, more than {MAX_FILES}"
    paths = [f.path for f in files]
    dirs = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    clash = sorted(dirs.intersection(paths))
    twice = sorted(p for p, n in Counter(paths).items() if n > 1)
    why = next((w for w in map(_check_file, files) if w is not None), None)
    if why is None and twice:
        why = f"it names {twice[0]!r} twice"
    if why is None and clash:
        why = f"it names {clash[0]!r} both as a file and as a directory"
    if why is None and key_of(files) != key:
        why = "its key is not the SHA-256 of its list of files"
    return why


def manifest_of(directory: Path) -> Manifest:
    """Read every file under `directory` (its hidden files and directories aside: .DS_Store, a
    download tool's .cache) and hash it whole. A symlink to a file counts as that file (a
    Hugging Face snapshot is made of them); a symlinked directory is not entered. OSError when
    a file cannot be read; ValueError for a name that check_path refuses or a file that is not
    a regular one."""
    files: list[ManifestFile] = []
    for top, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(top) / name
            rel = path.relative_to(directory).as_posix()
            why = check_path(rel)
            if why is not None:
                raise ValueError(f"{directory} holds {why}")
            # From its stat, before an open that a named pipe would block forever.
            if not stat.S_ISREG(path.stat().st_mode):
                raise ValueError(f"{path} is not a regular file")
            with path.open("rb") as f:
                digest, size = hashlib.sha256(), 0
                while chunk := f.read(READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
            files.append(ManifestFile(rel, size, digest.digest()))
    return Manifest(tuple(sorted(files, key=lambda f: f.path)))
