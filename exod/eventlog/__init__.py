"""The event log: an append-only SQLite store, the pure fold over it, and replay at start."""

from exod.eventlog.fold import (
    EMPTY,
    FOLD_VERSION,
    ErrorView,
    ModelView,
    PeerView,
    RunnerState,
    RunnerView,
    RunView,
    State,
    alive_runners,
    apply,
    decode,
    encode,
    fold,
    running_elsewhere,
)
from exod.eventlog.records import Record, kind_of
from exod.eventlog.replay import maybe_snapshot, replay, snapshot_seq
from exod.eventlog.store import EventStore, OriginConflict, StoreError

__all__ = [
    "EMPTY",
    "FOLD_VERSION",
    "ErrorView",
    "EventStore",
    "ModelView",
    "OriginConflict",
    "PeerView",
    "Record",
    "RunView",
    "RunnerState",
    "RunnerView",
    "State",
    "StoreError",
    "alive_runners",
    "apply",
    "decode",
    "encode",
    "fold",
    "kind_of",
    "maybe_snapshot",
    "replay",
    "running_elsewhere",
    "snapshot_seq",
]
