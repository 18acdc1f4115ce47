"""Rebuilding the state at start: the newest usable snapshot, then the records written after it."""

from __future__ import annotations

import logging

from exod.eventlog.fold import EMPTY, FOLD_VERSION, State, decode, encode, fold
from exod.eventlog.store import EventStore

log = logging.getLogger(__name__)

# Records folded per read, so that replaying a long log never holds all of it in memory.
BATCH = 1000


def replay(store: EventStore) -> State:
    """The state the log describes; the work is proportional to the records after the snapshot."""
    state = _from_snapshot(store)
    while batch := store.read(since=state.last_seq, limit=BATCH):
        # Keyed by origin: this node's records build its own state, the others' its peers'.
        state = fold(batch, state, own=store.origin)
    return state


def snapshot_seq(store: EventStore) -> int:
    """The seq of the newest snapshot of this fold version; 0 when there is none."""
    snapshot = store.load_snapshot(FOLD_VERSION)
    return 0 if snapshot is None else snapshot[0]


def maybe_snapshot(store: EventStore, state: State, every: int, since: int | None = None) -> bool:
    """Save a snapshot when at least `every` records were folded since the last one.

    `since` is the seq of the newest snapshot when the caller keeps track of it, which spares a
    read of the snapshot on every call; None reads it from the store.
    """
    if since is None:
        since = snapshot_seq(store)
    if state.last_seq - since < every:
        return False
    store.save_snapshot(state.last_seq, FOLD_VERSION, encode(state))
    return True


def _from_snapshot(store: EventStore) -> State:
    snapshot = store.load_snapshot(FOLD_VERSION)
    if snapshot is None:
        return EMPTY
    seq, data = snapshot
    try:
        state = decode(data)
    except ValueError as e:
        # Snapshots are only a shortcut: the log holds every fact, so fold all of it instead.
        log.warning("ignoring the snapshot at seq %d of %s: %s", seq, store.path, e)
        return EMPTY
    if state.last_seq != seq:
        log.warning(
            "ignoring the snapshot at seq %d of %s: its state ends at seq %d",
            seq,
            store.path,
            state.last_seq,
        )
        return EMPTY
    return state
