"""Writing a model directory as its bytes arrive, verified against its manifest while they do.

Each file's SHA-256 is computed from the bytes as they are written, never by reading the file
back; files come one at a time, each in order from offset 0. Anything the manifest does not say
(a file it does not list, a byte beyond a file's size, a digest that differs, a stream that ends
short) raises weights_corrupt, and the caller deletes the directory. Files are created only
inside `directory`, which the caller made empty: every path was checked (relative, no '..'),
every parent is made here, and a file is opened with O_EXCL | O_NOFOLLOW, so no symlink can be
followed out of it.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from exod.errors import ExoError
from exod.models.manifest import Manifest, ManifestFile

MAX_CHUNK = 1 << 20
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


class _Open:
    def __init__(self, file: ManifestFile, fd: int) -> None:
        self.file = file
        self.fd = fd
        self.written = 0
        self.digest = hashlib.sha256()


class Receiver:
    def __init__(self, directory: Path, manifest: Manifest, receiving: str) -> None:
        """`receiving` opens each refusal's message: who refuses what from whom ("node n-b
        refused the model … from node n-a"), for the sender's user who reads it."""
        self._dir = directory
        self._files = {f.path: f for f in manifest.files}
        self._receiving = receiving
        self._open: _Open | None = None
        self._done: set[str] = set()
        self.received = 0

    def write(self, path: str, offset: int, data: bytes) -> None:
        if len(data) > MAX_CHUNK:
            raise ExoError(
                "invalid_argument",
                f"{self._receiving}: it sent {len(data)} bytes in one chunk, more than {MAX_CHUNK}",
            )
        current = self._open
        if current is None or current.file.path != path:
            if current is not None:
                raise self._corrupt(
                    f"bytes of {path!r} before the end of {current.file.path!r} "
                    f"({current.written} of {current.file.size} bytes)"
                )
            current = self._start(path)
        if offset != current.written:
            raise self._corrupt(f"{path!r} at offset {offset} where {current.written} came")
        if current.written + len(data) > current.file.size:
            raise self._corrupt(f"more than the {current.file.size} bytes of {path!r}")
        self._write(current, data)
        if current.written == current.file.size:
            self._end(current)

    def finish(self) -> None:
        """Once the stream ended: every file complete (an empty one made now, which no chunk
        carries); weights_corrupt naming what is short otherwise."""
        current = self._open
        if current is not None:
            raise self._corrupt(
                f"only {current.written} of the {current.file.size} bytes of "
                f"{current.file.path!r} before the stream ended"
            )
        for path, file in sorted(self._files.items()):
            if path in self._done:
                continue
            if file.size:
                raise self._corrupt(f"none of {path!r} before the stream ended")
            self._end(self._start(path))

    def close(self) -> None:
        """Close the file being written (the caller deletes the directory)."""
        if self._open is not None:
            os.close(self._open.fd)
            self._open = None

    def _start(self, path: str) -> _Open:
        file = self._files.get(path)
        if file is None:
            raise self._corrupt(f"bytes of {path[:80]!r}, which its manifest does not list")
        if path in self._done:
            raise self._corrupt(f"more than the {file.size} bytes of {path!r}")
        target = self._dir.joinpath(*path.split("/"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, _CREATE, 0o600)
        except OSError as e:
            raise self._os_error(e) from None
        self._open = _Open(file, fd)
        return self._open

    def _write(self, current: _Open, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(current.fd, view) :]
        except OSError as e:
            raise self._os_error(e) from None
        current.digest.update(data)
        current.written += len(data)
        self.received += len(data)

    def _end(self, current: _Open) -> None:
        try:
            os.fsync(current.fd)  # before the rename that makes the entry visible
        except OSError as e:
            raise self._os_error(e) from None
        finally:
            os.close(current.fd)
            self._open = None
        self._done.add(current.file.path)
        if current.digest.digest() != current.file.sha256:
            raise self._corrupt(
                f"{current.file.path!r} whose SHA-256 is {current.digest.hexdigest()[:16]}…, "
                f"not the {current.file.sha256.hex()[:16]}… of its manifest"
            )

    def _corrupt(self, what: str) -> ExoError:
        return ExoError(
            "weights_corrupt",
            f"{self._receiving}: it sent {what}; nothing of it was kept: send it again, and if "
            "this repeats, check the sending node's disk and memory",
        )

    def _os_error(self, e: OSError) -> ExoError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return ExoError(
                "disk_full",
                f"{self._receiving}: the disk of {self._dir.parent} filled while it came; "
                "nothing of it was kept: free space on that disk",
            )
        return ExoError("internal", f"{self._receiving}: cannot write it: {e.strerror or e}")
