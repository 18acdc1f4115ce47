"""The node's own event log, folded as it grows and observable by followers.

One object owns the write path: append to SQLite (durably), fold the record into the state, wake
whoever follows the log, and snapshot every so often. The daemon, the supervisor and the control
service all write through it, so the state they read is always the fold of what is on disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from exod.errors import ExoError
from exod.eventlog import EventStore, Record, State, apply, maybe_snapshot, snapshot_seq
from exod.eventlog.store import RawRecord
from exod.proto.exo.v1 import events_pb2

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, store: EventStore, state: State, snapshot_every: int) -> None:
        self.store = store
        self.state = state
        self._snapshot_every = snapshot_every
        # Kept here so that an append does not read the last snapshot back to decide.
        self._snapshot_seq = snapshot_seq(store)
        # Replaced on every append; followers wait on the one that was current when they looked.
        self._changed = asyncio.Event()
        # Why this node must not write any more (its home is a copy: see fence), or "".
        self.fenced = ""

    def fence(self, why: str) -> None:
        """Refuse every write a command asks for from now on: a member holds more of this node's
        own stream than this log does (or another event under one of its numbers), so each new
        event would fork the stream that the members follow. What already runs ends as usual."""
        if not self.fenced:
            self.fenced = why

    def check_writable(self, doing: str) -> None:
        """ExoError copied_home while fenced; `doing` says what was refused, in words."""
        if self.fenced:
            raise ExoError("copied_home", f"this node does not {doing}: {self.fenced}")

    def append(self, event: events_pb2.Event) -> Record:
        """Write an event of this node; raises StoreError (disk_full) without changing the state."""
        record = self.store.append(event)
        self._folded(record)
        return record

    def append_foreign(self, records: Sequence[RawRecord]) -> list[Record]:
        """Keep and fold records copied from members; those held already are skipped. Raises
        OriginConflict (a number held with another payload) or StoreError, keeping none."""
        kept = self.store.append_foreign(records)
        for record in kept:
            self._folded(record)
        return kept

    def _folded(self, record: Record) -> None:
        self.state = apply(self.state, record, own=self.store.origin)
        log.debug("event %d %s of %s", record.seq, record.kind, record.origin)
        try:
            if maybe_snapshot(
                self.store, self.state, self._snapshot_every, since=self._snapshot_seq
            ):
                self._snapshot_seq = self.state.last_seq
        except Exception:
            # A snapshot is an optimisation: the log holds the truth, so failing to save one
            # (a full disk, say) must not fail the event that was just written.
            log.exception("could not save a snapshot")
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_beyond(self, seq: int) -> None:
        """Return once the log holds a record newer than `seq`."""
        while self.state.last_seq <= seq:
            await self._changed.wait()
