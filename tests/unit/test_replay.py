"""Replay at start: a snapshot plus the records after it rebuilds exactly the state of the log."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from exod.eventlog import (
    EMPTY,
    FOLD_VERSION,
    EventStore,
    Record,
    State,
    encode,
    fold,
    maybe_snapshot,
    replay,
    snapshot_seq,
)
from exod.proto.exo.v1 import events_pb2 as pb

# The package's `replay` is the function, which hides the module of the same name.
replay_module = importlib.import_module("exod.eventlog.replay")


class CountingStore(EventStore):
    """An EventStore that counts the records replay asks it for."""

    records_read = 0

    def read(self, since: int = 0, limit: int | None = None) -> list[Record]:
        records = super().read(since, limit)
        self.records_read += len(records)
        return records


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    s = CountingStore(tmp_path / "exod.db", "node-a")
    yield s
    s.close()


def life_of_a_runner(i: int) -> list[pb.Event]:
    """Five events, the most common shape of the log: a runner serves one run and is stopped."""
    runner, run = f"r{i}", f"run{i}"
    return [
        pb.Event(runner_spawned=pb.RunnerSpawned(runner_id=runner, model="tiny", pid=1000 + i)),
        pb.Event(runner_ready=pb.RunnerReady(runner_id=runner)),
        pb.Event(run_accepted=pb.RunAccepted(run_id=run, runner_id=runner, model="tiny")),
        pb.Event(run_finished=pb.RunFinished(run_id=run, stop_reason="stop")),
        pb.Event(runner_stopped=pb.RunnerStopped(runner_id=runner, reason="idle")),
    ]


def write(store: EventStore, runners: int, first: int = 0) -> None:
    for i in range(first, first + runners):
        for event in life_of_a_runner(i):
            store.append(event, ts=float(store.last_seq() + 1))


def full_fold(store: EventStore) -> State:
    return fold(EventStore.read(store))  # not counted: this is the reference, not the replay


def test_replaying_an_empty_log_gives_the_empty_state(store: CountingStore) -> None:
    assert replay(store) == EMPTY


def test_replay_without_a_snapshot_folds_the_whole_log(store: CountingStore) -> None:
    write(store, 3)
    store.append(pb.Event(node_started=pb.NodeStarted(pid=1)))
    state = replay(store)
    assert state == full_fold(store)
    assert (state.starts, state.last_seq, store.records_read) == (1, 16, 16)


def test_replay_reads_in_batches_and_misses_none_at_their_edges(
    store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_module, "BATCH", 10)
    write(store, 5)  # 25 records: two full batches and a partial one
    assert replay(store) == full_fold(store)
    assert store.records_read == 25


def test_a_snapshot_plus_the_records_after_it_equals_the_full_fold(store: CountingStore) -> None:
    write(store, 4)
    assert maybe_snapshot(store, replay(store), every=1)
    write(store, 2, first=4)
    # An alive runner and a run in flight after the snapshot too.
    store.append(pb.Event(runner_spawned=pb.RunnerSpawned(runner_id="last", pid=7)))
    store.append(pb.Event(run_accepted=pb.RunAccepted(run_id="open", runner_id="last")))
    store.records_read = 0
    state = replay(store)
    assert state == full_fold(store)
    assert store.records_read == 12  # only those after the snapshot at seq 20
    assert set(state.runs) == {"open"}


def test_replay_right_after_a_snapshot_reads_no_records(store: CountingStore) -> None:
    write(store, 2)
    maybe_snapshot(store, replay(store), every=1)
    store.records_read = 0
    assert replay(store) == full_fold(store)
    assert store.records_read == 0


@pytest.mark.parametrize("runners", [200, 1000])  # logs of 1000 and 5000 events
def test_replay_after_a_snapshot_does_not_depend_on_the_length_of_the_log(
    tmp_path: Path, runners: int
) -> None:
    with CountingStore(tmp_path / "exod.db", "node-a") as store:
        # Durability is not under test here: without it, thousands of appends take milliseconds.
        store._db.execute("PRAGMA synchronous = OFF")
        write(store, runners)
        assert maybe_snapshot(store, replay(store), every=500)
        write(store, 2, first=runners)
        store.records_read = 0
        state = replay(store)
        assert store.records_read == 10
        assert state == full_fold(store)
        assert state.last_seq == 5 * runners + 10


def test_a_snapshot_of_another_fold_version_is_ignored(store: CountingStore) -> None:
    write(store, 2)
    wrong = replace(EMPTY, starts=999, last_seq=store.last_seq())
    store.save_snapshot(store.last_seq(), FOLD_VERSION + 1, encode(wrong))
    assert replay(store) == full_fold(store)
    assert store.records_read == 10


def test_a_damaged_snapshot_is_ignored_and_the_whole_log_folded(
    store: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    write(store, 2)
    store.save_snapshot(store.last_seq(), FOLD_VERSION, b'{"runners": [')
    with caplog.at_level(logging.WARNING):
        state = replay(store)
    assert state == full_fold(store)
    assert store.records_read == 10
    assert "ignoring the snapshot at seq 10" in caplog.text


def test_a_snapshot_that_disagrees_with_its_seq_is_ignored(store: CountingStore) -> None:
    write(store, 2)
    store.save_snapshot(5, FOLD_VERSION, encode(replace(EMPTY, starts=3, last_seq=9)))
    assert replay(store) == full_fold(store)


def test_a_snapshot_is_saved_once_every_n_records(store: CountingStore) -> None:
    write(store, 1)  # 5 records
    assert not maybe_snapshot(store, replay(store), every=10)
    assert store.load_snapshot(FOLD_VERSION) is None
    write(store, 1, first=1)  # 10
    assert maybe_snapshot(store, replay(store), every=10)
    write(store, 1, first=2)  # 15
    assert not maybe_snapshot(store, replay(store), every=10)
    assert store.load_snapshot(FOLD_VERSION) == (10, encode(fold(EventStore.read(store, 0, 10))))
    write(store, 1, first=3)  # 20
    assert maybe_snapshot(store, replay(store), every=10)
    snapshot = store.load_snapshot(FOLD_VERSION)
    assert snapshot is not None
    assert snapshot[0] == 20


def test_a_caller_that_tracks_the_last_snapshot_decides_from_it(store: CountingStore) -> None:
    write(store, 2)  # 10 records, no snapshot yet
    state = replay(store)
    # Told that a snapshot exists at seq 5, five more records are not enough to save another.
    assert not maybe_snapshot(store, state, every=10, since=5)
    assert store.load_snapshot(FOLD_VERSION) is None
    assert maybe_snapshot(store, state, every=10, since=0)
    assert snapshot_seq(store) == 10


def test_snapshots_of_another_fold_version_do_not_delay_the_next_one(
    store: CountingStore,
) -> None:
    write(store, 2)
    store.save_snapshot(10, FOLD_VERSION + 1, b"newer exod")
    assert maybe_snapshot(store, replay(store), every=10)
