"""The model cache: model directories this node received from members of its cluster (a rank's
part of a split model), each under `$EXOD_HOME/cache/models/<key>/`, `key` being its manifest's
content key (exod/models/manifest.py).

An entry is complete or absent: it is received under a hidden temporary name in the same
directory and renamed into place at the end; anything hidden there at start is a leftover of an
exod that stopped mid-receive (or mid-eviction), and is deleted. The cache is bounded by
EXOD_MODEL_CACHE_BYTES, counting what is being received too: to make room, entries are evicted
least recently used first (a directory's mtime is its last use: a HasModel that found it, a rank
that used it), never one in use (`use`, which a rank holds while it runs), and a push that
cannot fit even so is refused with disk_full before a byte of it is written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from exod.errors import ExoError
from exod.models.manifest import KEY

log = logging.getLogger(__name__)

SETTING = "EXOD_MODEL_CACHE_BYTES"
# Prefixes of what is not (or no longer) an entry: a directory being received, one being evicted.
INCOMING = ".incoming-"
EVICTING = ".evicting-"


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    last_used: float
    pinned: bool


def evictions(entries: Sequence[Entry], short: int) -> list[Entry] | None:
    """The entries to evict to free at least `short` bytes: least recently used first, never a
    pinned one; None when evicting every unpinned entry would not free enough."""
    chosen: list[Entry] = []
    freed = 0
    for entry in sorted(entries, key=lambda e: (e.last_used, e.key)):
        if freed >= short:
            break
        if not entry.pinned:
            chosen.append(entry)
            freed += entry.size
    return chosen if freed >= short else None


def _size(n: int) -> str:
    """As admission's refusals write sizes: MiB below a GiB."""
    return f"{n / (1 << 20):.0f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def _dir_size(path: Path) -> int:
    return sum((Path(top) / n).lstat().st_size for top, _, names in os.walk(path) for n in names)


class Incoming:
    """A directory being received: under a hidden name until `commit` renames it into place;
    `abort` deletes it. Its reserved size counts in the cache's bound until either."""

    def __init__(self, cache: ModelCache, key: str, path: Path) -> None:
        self.key = key
        self.path = path
        self._cache = cache

    def commit(self) -> Path:
        """The entry, in place. One received meanwhile by another push of the same key stays,
        and this copy is dropped: the content is the same."""
        return self._cache._commit(self)

    def abort(self) -> None:
        self._cache._abort(self)


class ModelCache:
    def __init__(self, root: Path, bound: int, node_id: str) -> None:
        """`bound`: EXOD_MODEL_CACHE_BYTES, resolved to bytes; `node_id` for the messages, which
        the member that sends reads."""
        self.root = root
        self.bound = bound
        self.node_id = node_id
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self._incoming: dict[Path, int] = {}  # reserved bytes of each directory being received
        self._sizes: dict[str, int] = {}  # an entry never changes once in place

    def clean(self) -> None:
        """Delete what an exod that stopped mid-receive or mid-eviction left (at start)."""
        try:
            leftovers = [p for p in self.root.iterdir() if p.name.startswith(".")]
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("cannot read the model cache %s: %s", self.root, e)
            return
        for path in leftovers:
            log.info("deleting %s, left by an exod that stopped while receiving it", path)
            shutil.rmtree(path, ignore_errors=True)

    def path(self, key: str) -> Path:
        if not KEY.fullmatch(key):
            raise ValueError(f"not a content key: {key[:80]!r}")
        return self.root / key

    def has(self, key: str) -> bool:
        """Whether the entry is here (then complete); a yes counts as a use."""
        path = self.path(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return path.is_dir()

    def entries(self) -> list[Entry]:
        try:
            paths = [p for p in self.root.iterdir() if KEY.fullmatch(p.name)]
        except FileNotFoundError:
            return []
        found = []
        for path in paths:
            try:
                last_used = path.stat().st_mtime
            except FileNotFoundError:  # evicted meanwhile
                continue
            size = self._sizes.get(path.name)
            if size is None:
                size = self._sizes[path.name] = _dir_size(path)
            found.append(Entry(path.name, size, last_used, self._pins.get(path.name, 0) > 0))
        return found

    @contextmanager
    def use(self, key: str) -> Iterator[Path]:
        """The entry's directory, kept from eviction until the block ends (a rank that runs on
        it); model_not_found when it is not here."""
        path = self.path(key)
        with self._lock:
            if not path.is_dir():
                raise ExoError(
                    "model_not_found",
                    f"node {self.node_id} holds no model {key[:16]}… in its cache: send it again",
                )
            self._pins[key] = self._pins.get(key, 0) + 1
            os.utime(path)
        try:
            yield path
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]
            # The end of a use is a use too: what ran last is evicted last.
            with suppress(FileNotFoundError):
                os.utime(path)

    def reserve(self, key: str, size: int) -> Incoming:
        """A hidden directory to receive `size` bytes of entry `key` in, room made for it by
        evicting entries not in use (least recently used first); disk_full, with nothing
        evicted, when even that cannot make room under the bound or on the disk."""
        self.path(key)  # a valid key
        with self._lock:
            if not self.bound:
                raise ExoError(
                    "disk_full",
                    f"node {self.node_id} keeps no models for its cluster ({SETTING} is 0): set "
                    f"{SETTING} there to a size, or a percentage of its disk",
                )
            if size > self.bound:
                raise ExoError(
                    "disk_full",
                    f"node {self.node_id} keeps at most {_size(self.bound)} of models for its "
                    f"cluster ({SETTING}), and this one needs {_size(size)}: raise {SETTING} "
                    "there (a size, or a percentage of its disk)",
                )
            self.root.mkdir(parents=True, exist_ok=True)
            entries = self.entries()
            held = sum(e.size for e in entries)
            receiving = sum(self._incoming.values())
            free = shutil.disk_usage(self.root).free
            over_bound = held + receiving + size - self.bound
            # What is being received counts as not written yet (some may be: erring safe).
            over_disk = size + receiving - free
            plan = evictions(entries, max(over_bound, over_disk))
            if plan is None:
                raise self._no_room(entries, size, receiving, free, over_bound >= over_disk)
            for entry in plan:
                self._evict(entry)
            path = Path(tempfile.mkdtemp(prefix=f"{INCOMING}{key[:16]}-", dir=self.root))
            self._incoming[path] = size
        return Incoming(self, key, path)

    def _no_room(
        self, entries: list[Entry], size: int, receiving: int, free: int, bound_bites: bool
    ) -> ExoError:
        in_use = sum(e.size for e in entries if e.pinned)
        if bound_bites:
            held = sum(e.size for e in entries)
            busy = f"{_size(in_use)} of it in use by models running there, which stay"
            if receiving:
                busy += f", and {_size(receiving)} more being received"
            return ExoError(
                "disk_full",
                f"node {self.node_id} cannot keep {_size(size)} more of models for its cluster: "
                f"it holds {_size(held)} of its {_size(self.bound)} ({SETTING}), {busy}; raise "
                f"{SETTING} there, or stop a split model that runs there",
            )
        return ExoError(
            "disk_full",
            f"the disk of {self.root} on node {self.node_id} has {_size(free)} free, and this "
            f"model needs {_size(size)} even after evicting every cached model not in use: free "
            "space on that disk",
        )

    def _evict(self, entry: Entry) -> None:
        """Out of sight at once (a rename), then deleted."""
        path = self.path(entry.key)
        gone = self.root / f"{EVICTING}{entry.key[:16]}-{time.monotonic_ns()}"
        path.rename(gone)
        self._sizes.pop(entry.key, None)
        log.info("evicted model %s (%s) from the model cache", entry.key[:16], _size(entry.size))
        shutil.rmtree(gone, ignore_errors=True)

    def _commit(self, incoming: Incoming) -> Path:
        final = self.path(incoming.key)
        with self._lock:
            self._incoming.pop(incoming.path, None)
            if final.is_dir():
                shutil.rmtree(incoming.path, ignore_errors=True)
                os.utime(final)
                return final
            incoming.path.rename(final)
            os.utime(final)
            _fsync_dir(self.root)
        return final

    def _abort(self, incoming: Incoming) -> None:
        with self._lock:
            self._incoming.pop(incoming.path, None)
        shutil.rmtree(incoming.path, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    """The rename survives a power cut (the files were synced before it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
