"""The event log on disk: an append-only SQLite table of protobuf events, plus fold snapshots.

This is the only module that talks to SQLite for the log. Every failure leaves it as a StoreError
whose message names the database file and says what went wrong in words a user can act on.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, Self

from google.protobuf.message import DecodeError
from sqlite_utils import Database

from exod.config import user_name
from exod.eventlog.migrations import migrate
from exod.eventlog.records import Record, kind_of
from exod.proto.exo.v1 import events_pb2

# How long a write waits for a lock held by another connection before giving up. Short: only
# exod writes its log, so a lock that outlasts this is another process that should not be there.
BUSY_TIMEOUT_S = 2.0
# Snapshots kept; older ones are deleted when a new one is saved, so the table stays small.
SNAPSHOTS_KEPT = 3


class StoreError(Exception):
    """The event log cannot be read or written; the message says which file and why."""

    def __init__(
        self, message: str, *, disk_full: bool = False, busy: bool = False, unusable: bool = False
    ) -> None:
        super().__init__(message)
        # A full disk is a temporary failure (exit 75): the caller may retry once space is freed.
        self.disk_full = disk_full
        # Another process holds the lock: temporary too.
        self.busy = busy
        # The file cannot be used as it is (damaged, not a database, a directory, not this user's
        # to write): only a person can fix it, so exod refuses to start (exit 78) rather than
        # be restarted in a loop.
        self.unusable = unusable


class RawRecord(NamedTuple):
    """A record as stored, its payload not parsed: what replication sends, byte for byte."""

    origin: str
    origin_seq: int
    ts: float
    kind: str
    payload: bytes


class OriginConflict(Exception):
    """A record of another origin arrived that this log holds already with another payload:
    two nodes write under one id (a copied home). The message says which."""


class EventStore:
    """The event log of one node, safe to call from any thread (calls are serialised)."""

    def __init__(self, path: Path, origin: str) -> None:
        if not origin:
            raise ValueError("origin must be a node id, not empty")
        self.path = path
        self.origin = origin
        self._lock = threading.Lock()
        with self._errors("open"):
            # check_same_thread=False because the lock above serialises every use.
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            with self._errors("open"):
                # No plugins: what the log's connection does must not depend on what else is
                # installed in the environment.
                self._db = Database(conn, execute_plugins=False)
                self._quick_check()
                self._db.enable_wal()
                # FULL: an event is on disk before append returns, so a fact the daemon acted
                # on (a runner it spawned) survives a power cut and is cleaned up at the next start.
                self._db.execute("PRAGMA synchronous=FULL")
                if sys.platform == "darwin":
                    # fsync on macOS does not flush the drive's cache; F_FULLFSYNC does.
                    self._db.execute("PRAGMA fullfsync=ON")
                migrate(self._db)
                self._check_writable()
        except BaseException:
            conn.close()
            raise

    def append(self, event: events_pb2.Event, ts: float | None = None) -> Record:
        """Write one of this node's own events durably; return it as it will be read back."""
        kind = kind_of(event)
        if not kind:
            raise ValueError("an event must have one of its kinds set")
        when = time.time() if ts is None else ts
        payload = event.SerializeToString()
        with self._lock, self._errors("write an event to"), self._db.atomic():
            # origin_seq is computed inside the INSERT, so it cannot race with another write;
            # the UNIQUE (origin, origin_seq) index makes the MAX a single index lookup.
            rows = self._db.execute(
                "INSERT INTO events (origin, origin_seq, ts, kind, payload) VALUES (?, "
                "(SELECT COALESCE(MAX(origin_seq), 0) + 1 FROM events WHERE origin = ?), ?, ?, ?) "
                "RETURNING seq, origin_seq",
                [self.origin, self.origin, when, kind, payload],
            ).fetchall()
        seq, origin_seq = rows[0]
        # A copy parsed from what was stored: the caller may go on to change its message.
        return Record(
            seq, self.origin, origin_seq, when, kind, events_pb2.Event.FromString(payload)
        )

    def append_foreign(self, records: Sequence[RawRecord]) -> list[Record]:
        """Keep records other nodes wrote, under their own origin and origin_seq, in one
        transaction; those held already (resent) are skipped; the new ones are returned. A record
        held with another payload under its number is an OriginConflict, and nothing of the batch
        is kept. Payloads are kept byte for byte, so that they compare exactly."""
        for r in records:
            if r.origin == self.origin:
                raise OriginConflict(f"a record of this node's own id {r.origin} came from a peer")
        kept: list[tuple[int, RawRecord]] = []
        with self._lock, self._errors("write an event to"):
            # NORMAL for a copy: a record lost to a power cut is fetched again from its origin
            # (the follower resumes from what is held), so it need not wait for the disk. Set
            # outside the transaction, and back to FULL for this node's own events after it.
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._db.atomic():
                    for r in records:
                        seq = self._insert_foreign(r)
                        if seq is not None:
                            kept.append((seq, r))
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
        return [
            self._record((seq, r.origin, r.origin_seq, r.ts, r.kind, r.payload)) for seq, r in kept
        ]

    def _insert_foreign(self, r: RawRecord) -> int | None:
        held = self._db.execute(
            "SELECT payload FROM events WHERE origin = ? AND origin_seq = ?",
            [r.origin, r.origin_seq],
        ).fetchone()
        if held is not None:
            if bytes(held[0]) == r.payload:
                return None
            raise OriginConflict(
                f"event {r.origin_seq} of {r.origin} arrived with another payload than the one "
                "held: two nodes write under that id"
            )
        rows = self._db.execute(
            "INSERT INTO events (origin, origin_seq, ts, kind, payload) "
            "VALUES (?, ?, ?, ?, ?) RETURNING seq",
            [r.origin, r.origin_seq, r.ts, r.kind, r.payload],
        ).fetchall()
        return int(rows[0][0])

    def read(self, since: int = 0, limit: int | None = None) -> list[Record]:
        """Records with seq > since, in seq order; at most limit of them when given."""
        with self._lock, self._errors("read"):
            rows = self._db.execute(
                f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?",  # _SELECT is a constant
                # SQLite reads a negative LIMIT as no limit.
                [since, -1 if limit is None else limit],
            ).fetchall()
        return [self._record(row) for row in rows]

    def read_of(self, origin: str, since: int = 0, limit: int | None = None) -> list[Record]:
        """The records of `origin` (one member's stream) with seq > since, in seq order."""
        with self._lock, self._errors("read"):
            rows = self._db.execute(
                f"{_SELECT} WHERE seq > ? AND origin = ? ORDER BY seq LIMIT ?",
                [since, origin, -1 if limit is None else limit],
            ).fetchall()
        return [self._record(row) for row in rows]

    def read_origin(
        self, origin: str, after: int, kinds: Collection[str], limit: int
    ) -> list[RawRecord]:
        """Records of `origin` with origin_seq > after whose kind is one of `kinds`, in
        origin_seq order, at most `limit`; payloads unparsed, as stored (to be sent on)."""
        where = f"origin = ? AND origin_seq > ? AND kind IN ({_marks(kinds)})"
        query = f"{_SELECT} WHERE {where} ORDER BY origin_seq LIMIT ?"  # ?s only
        with self._lock, self._errors("read"):
            rows = self._db.execute(query, [origin, after, *sorted(kinds), limit]).fetchall()
        return [RawRecord(o, int(n), float(ts), k, bytes(p)) for _, o, n, ts, k, p in rows]

    def last_of_kinds(self, origin: str, upto: int, kinds: Collection[str]) -> int:
        """The highest origin_seq <= upto of `origin` among `kinds`; 0 when there is none."""
        where = f"origin = ? AND origin_seq <= ? AND kind IN ({_marks(kinds)})"
        query = f"SELECT COALESCE(MAX(origin_seq), 0) FROM events WHERE {where}"  # noqa: S608  # ?s only
        with self._lock, self._errors("read"):
            row = self._db.execute(query, [origin, upto, *sorted(kinds)]).fetchone()
        return int(row[0])

    def payload_at(self, origin: str, origin_seq: int) -> bytes | None:
        """The stored payload of one record, byte for byte; None when it is not held."""
        with self._lock, self._errors("read"):
            row = self._db.execute(
                "SELECT payload FROM events WHERE origin = ? AND origin_seq = ?",
                [origin, origin_seq],
            ).fetchone()
        return None if row is None else bytes(row[0])

    def held(self, origin: str) -> int:
        """The highest origin_seq of `origin` this log holds; 0 when none."""
        with self._lock, self._errors("read"):
            row = self._db.execute(
                "SELECT COALESCE(MAX(origin_seq), 0) FROM events WHERE origin = ?", [origin]
            ).fetchone()
        return int(row[0])

    def held_by_origin(self) -> dict[str, int]:
        """The highest origin_seq held of every origin in the log."""
        with self._lock, self._errors("read"):
            rows = self._db.execute(
                "SELECT origin, MAX(origin_seq) FROM events GROUP BY origin"
            ).fetchall()
        return {str(o): int(n) for o, n in rows}

    def last_seq(self) -> int:
        """The seq of the newest record; 0 when the log is empty."""
        with self._lock, self._errors("read"):
            row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(row[0])

    def count(self) -> int:
        with self._lock, self._errors("read"):
            row = self._db.execute("SELECT COUNT(*) FROM events").fetchone()
        return int(row[0])

    def save_snapshot(self, seq: int, fold_version: int, state: bytes) -> None:
        """Store the fold's state as of record seq, and drop all but the newest few snapshots."""
        with self._lock, self._errors("write a snapshot to"), self._db.atomic():
            self._db.execute(
                "INSERT OR REPLACE INTO snapshots (seq, fold_version, state, ts) "
                "VALUES (?, ?, ?, ?)",
                [seq, fold_version, state, time.time()],
            )
            self._db.execute(
                "DELETE FROM snapshots WHERE rowid NOT IN "
                "(SELECT rowid FROM snapshots ORDER BY seq DESC, ts DESC LIMIT ?)",
                [SNAPSHOTS_KEPT],
            )

    def load_snapshot(self, fold_version: int) -> tuple[int, bytes] | None:
        """(seq, state) of the newest snapshot made by this fold version; None when there is none.

        Snapshots of other versions are ignored: their encoding or meaning may differ, so the
        caller rebuilds the state from the log instead.
        """
        with self._lock, self._errors("read a snapshot from"):
            row = self._db.execute(
                "SELECT seq, state FROM snapshots WHERE fold_version = ? ORDER BY seq DESC LIMIT 1",
                [fold_version],
            ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def check(self) -> None:
        """A cheap read that fails when the database cannot be used (for health self-checks)."""
        self.last_seq()

    def pragmas(self) -> dict[str, str | int]:
        """The durability settings in force on this connection (for diagnostics and tests)."""
        names = ("journal_mode", "synchronous", "fullfsync", "busy_timeout")
        with self._lock, self._errors("read settings of"):
            return {name: self._db.execute(f"PRAGMA {name}").fetchone()[0] for name in names}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_writable(self) -> None:
        # SQLite opens a file it may read but not write read-only, without a word, and in WAL
        # mode even takes the write lock; only a write fails. Write the header's user_version
        # back unchanged and roll it back, so exod refuses to start instead of failing at its
        # first event.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            self._db.execute(f"PRAGMA user_version = {version}")
        finally:
            self._db.execute("ROLLBACK")

    def _quick_check(self) -> None:
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        # One line per problem, some spanning lines themselves; a message should be one line.
        problems = [" ".join(str(r[0]).split()) for r in rows if r[0] != "ok"]
        if problems:
            raise StoreError(_damaged(self.path, "; ".join(problems[:3])), unusable=True)

    def _record(self, row: tuple[Any, ...]) -> Record:
        seq, origin, origin_seq, ts, kind, payload = row
        try:
            event = events_pb2.Event.FromString(payload)
        except DecodeError as e:
            message = _damaged(self.path, f"event {seq} does not parse: {e}")
            raise StoreError(message, unusable=True) from None
        return Record(seq, origin, origin_seq, ts, kind, event)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn sqlite3 errors into StoreErrors that name the file and the likely cause."""
        try:
            yield
        except sqlite3.Error as e:
            raise _store_error(e, doing, self.path) from e


_SELECT = "SELECT seq, origin, origin_seq, ts, kind, payload FROM events"


def _marks(items: Collection[str]) -> str:
    """One SQL parameter per item: "?,?,?"."""
    return ",".join("?" * len(items))


def _damaged(path: Path, detail: str) -> str:
    return (
        f"the event log {path} is damaged ({detail}); with exod stopped, restore the file from "
        "a backup, or move it aside to start with an empty log"
    )


def _store_error(e: sqlite3.Error, doing: str, path: Path) -> StoreError:
    # The primary result code, without extended bits; errors raised by the sqlite3 module itself
    # (a closed connection) carry none.
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return StoreError(f"cannot {doing} the event log {path}: the disk is full", disk_full=True)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(
            f"cannot {doing} the event log {path}: it is locked by another process "
            f"(waited {BUSY_TIMEOUT_S:g} s); is a second exod using the same state dir?",
            busy=True,
        )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreError(_damaged(path, str(e)), unusable=True)
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        return StoreError(
            f"cannot {doing} the event log {path}: {_unwritable(path)}", unusable=True
        )
    return StoreError(f"cannot {doing} the event log {path}: {e}")


def _unwritable(path: Path) -> str:
    """Why SQLite could not open or write the file: it says only "unable to open" or "readonly"."""
    if path.is_dir():
        return "it is a directory, not a database file; move it aside to start with an empty log"
    if not path.parent.is_dir():
        return "its directory does not exist"
    user = user_name()
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return (
            f"user {user} may not read and write it; give it back to {user} (chown), or move "
            "it aside to start with an empty log"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return (
            f"user {user} may not write in {path.parent}, where SQLite keeps its journal next "
            "to the log; give that user write access to the directory"
        )
    return (
        "SQLite cannot open it for reading and writing (a read-only file system?); set "
        "EXOD_HOME to a directory exod can write"
    )
