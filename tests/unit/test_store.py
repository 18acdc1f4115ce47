"""The SQLite event store: what is written is read back, durably, and failures say what happened."""

from __future__ import annotations

import datetime
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlite_utils import Database

from exod.eventlog import EventStore, Record, StoreError
from exod.eventlog import store as store_module
from exod.eventlog.migrations import MIGRATIONS, applied, migrate
from exod.proto.exo.v1 import events_pb2 as pb


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "exod.db"


@pytest.fixture
def store(path: Path) -> Iterator[EventStore]:
    s = EventStore(path, "node-a")
    yield s
    s.close()


def started(pid: int = 1) -> pb.Event:
    return pb.Event(node_started=pb.NodeStarted(version="0.1.0", pid=pid, hostname="h"))


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection to the file, as a second process would have."""
    return sqlite3.connect(path, isolation_level=None)


# ---- append and read ----


def test_events_are_read_back_in_the_order_they_were_appended(store: EventStore) -> None:
    events = [
        started(),
        pb.Event(runner_spawned=pb.RunnerSpawned(runner_id="r1", model="tiny", pid=7)),
        pb.Event(runner_failed=pb.RunnerFailed(runner_id="r1", reason="crashed", signal=9)),
    ]
    for i, event in enumerate(events):
        store.append(event, ts=1000.0 + i)
    assert store.read() == [
        Record(
            seq=1, origin="node-a", origin_seq=1, ts=1000.0, kind="NodeStarted", event=events[0]
        ),
        Record(2, "node-a", 2, 1001.0, "RunnerSpawned", events[1]),
        Record(3, "node-a", 3, 1002.0, "RunnerFailed", events[2]),
    ]


def test_append_returns_the_record_as_it_is_read_back(store: EventStore) -> None:
    first = store.append(started(1), ts=5.5)
    second = store.append(started(2))
    assert store.read() == [first, second]


def test_the_returned_record_does_not_change_with_the_callers_message(store: EventStore) -> None:
    event = started(1)
    record = store.append(event)
    event.node_started.pid = 99
    assert record.event.node_started.pid == 1


def test_append_without_a_time_stamps_it_now(store: EventStore) -> None:
    before = time.time()
    record = store.append(started())
    assert before <= record.ts <= time.time()
    assert store.read()[0].ts == record.ts


def test_every_field_of_the_payload_survives_the_round_trip(store: EventStore) -> None:
    event = pb.Event(
        run_accepted=pb.RunAccepted(
            run_id="run-ü",
            runner_id="r1",
            model="名前",
            prompt_bytes=2**31 - 1,
            prompt_hmac="ab" * 32,
            max_tokens=-1,
            temperature=0.1,
        )
    )
    store.append(event)
    (record,) = store.read()
    assert record.event == event
    with closing(raw(store.path)) as conn:
        (payload,) = conn.execute("SELECT payload FROM events").fetchone()
    assert payload == event.SerializeToString()


def test_read_since_and_limit_page_through_the_log(store: EventStore) -> None:
    for pid in range(10):
        store.append(started(pid))
    assert [r.seq for r in store.read(since=3, limit=4)] == [4, 5, 6, 7]
    assert [r.seq for r in store.read(since=8)] == [9, 10]
    assert store.read(since=10) == []
    assert store.read(limit=0) == []


def test_last_seq_and_count_follow_appends(store: EventStore) -> None:
    assert (store.last_seq(), store.count()) == (0, 0)
    for pid in range(3):
        store.append(started(pid))
    assert (store.last_seq(), store.count()) == (3, 3)


def test_an_event_with_no_kind_is_refused(store: EventStore) -> None:
    with pytest.raises(ValueError, match="kind"):
        store.append(pb.Event())
    assert store.count() == 0


def test_the_store_can_be_used_from_another_thread(store: EventStore) -> None:
    thread = threading.Thread(target=store.append, args=(started(),))
    thread.start()
    thread.join()
    assert store.count() == 1


# ---- origin_seq ----


def test_origin_seq_continues_where_the_log_left_off_after_a_reopen(path: Path) -> None:
    with EventStore(path, "node-a") as first:
        first.append(started())
        first.append(started())
    with EventStore(path, "node-a") as again:
        record = again.append(started())
    assert (record.seq, record.origin_seq) == (3, 3)


def test_origin_seq_counts_each_origin_on_its_own(path: Path) -> None:
    with EventStore(path, "node-a") as a:
        a.append(started())
        a.append(started())
    with EventStore(path, "node-b") as b:
        record = b.append(started())
        records = b.read()
    assert (record.seq, record.origin, record.origin_seq) == (3, "node-b", 1)
    assert [(r.origin, r.origin_seq) for r in records] == [
        ("node-a", 1),
        ("node-a", 2),
        ("node-b", 1),
    ]


def test_an_origin_cannot_have_two_events_at_the_same_origin_seq(store: EventStore) -> None:
    store.append(started())
    with closing(raw(store.path)) as conn, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute(
            "INSERT INTO events (origin, origin_seq, ts, kind, payload) VALUES (?, ?, ?, ?, ?)",
            ["node-a", 1, 0.0, "NodeStarted", started().SerializeToString()],
        )


def test_an_empty_origin_is_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="origin"):
        EventStore(path, "")


# ---- migrations ----


def test_migrations_are_applied_and_recorded_once(path: Path) -> None:
    EventStore(path, "node-a").close()
    with closing(raw(path)) as conn:
        first = conn.execute("SELECT name, applied_at FROM _migrations ORDER BY rowid").fetchall()
    EventStore(path, "node-a").close()
    with closing(raw(path)) as conn:
        again = conn.execute("SELECT name, applied_at FROM _migrations ORDER BY rowid").fetchall()
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert [name for name, _ in first] == ["m001_events", "m002_snapshots"]
    assert again == first  # not applied a second time
    for _, applied_at in first:
        assert datetime.datetime.fromisoformat(applied_at).tzinfo is not None
    assert {"events", "snapshots", "_migrations"} <= tables


def test_a_migration_added_later_runs_once_on_an_existing_database(path: Path) -> None:
    with EventStore(path, "node-a") as old:
        old.append(started())
    calls: list[str] = []

    def m003_tags(db: Database) -> None:
        calls.append("m003_tags")
        db.execute("CREATE TABLE tags (name TEXT)")

    db = Database(path)
    try:
        assert migrate(db, [*MIGRATIONS, m003_tags]) == ["m003_tags"]
        assert migrate(db, [*MIGRATIONS, m003_tags]) == []
        assert applied(db) == ["m001_events", "m002_snapshots", "m003_tags"]
    finally:
        db.close()
    assert calls == ["m003_tags"]
    with EventStore(path, "node-a") as reopened:
        assert reopened.count() == 1  # the events written before it are untouched


def test_a_migration_that_fails_leaves_nothing_behind_and_stays_pending(path: Path) -> None:
    EventStore(path, "node-a").close()

    def m003_broken(db: Database) -> None:
        db.execute("CREATE TABLE half (name TEXT)")
        raise RuntimeError("interrupted")

    db = Database(path)
    try:
        with pytest.raises(RuntimeError):
            migrate(db, [*MIGRATIONS, m003_broken])
        assert "m003_broken" not in applied(db)
        assert not db["half"].exists()
    finally:
        db.close()


# ---- durability settings ----


def test_the_log_is_in_wal_mode_with_full_sync(store: EventStore) -> None:
    pragmas = store.pragmas()
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["synchronous"] == 2  # FULL
    assert pragmas["fullfsync"] == (1 if sys.platform == "darwin" else 0)
    assert pragmas["busy_timeout"] == 2000
    with closing(raw(store.path)) as conn:  # WAL is a property of the file, seen by everyone
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---- snapshots ----


def test_a_snapshot_is_loaded_only_by_the_fold_version_that_saved_it(store: EventStore) -> None:
    store.save_snapshot(10, 1, b"state one")
    store.save_snapshot(20, 2, b"state two")
    assert store.load_snapshot(1) == (10, b"state one")
    assert store.load_snapshot(2) == (20, b"state two")
    assert store.load_snapshot(3) is None


def test_the_newest_snapshot_is_loaded(store: EventStore) -> None:
    store.save_snapshot(10, 1, b"ten")
    store.save_snapshot(30, 1, b"thirty")
    store.save_snapshot(20, 1, b"twenty")
    assert store.load_snapshot(1) == (30, b"thirty")


def test_saving_a_snapshot_at_the_same_seq_again_replaces_it(store: EventStore) -> None:
    store.save_snapshot(10, 1, b"old")
    store.save_snapshot(10, 1, b"new")
    assert store.load_snapshot(1) == (10, b"new")


def test_only_the_newest_few_snapshots_are_kept(store: EventStore) -> None:
    for seq in range(1, 21):
        store.save_snapshot(seq * 100, 1, b"x" * 1000)
    with closing(raw(store.path)) as conn:
        seqs = [row[0] for row in conn.execute("SELECT seq FROM snapshots ORDER BY seq")]
    assert seqs == [1800, 1900, 2000]
    assert store.load_snapshot(1) == (2000, b"x" * 1000)


def test_no_snapshot_in_a_new_log(store: EventStore) -> None:
    assert store.load_snapshot(1) is None


# ---- failures ----


def test_a_damaged_database_is_refused_at_open_saying_where_it_is(path: Path) -> None:
    with EventStore(path, "node-a") as store:
        for i in range(300):
            store.append(pb.Event(model_added=pb.ModelAdded(name=f"m{i}", path="/p" * 50)))
    assert not Path(f"{path}-wal").exists()  # everything is in the main file, which we damage
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page : 4 * page] = bytes(range(256)) * (2 * page // 256)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged") as raised:
        EventStore(path, "node-a")
    assert str(path) in str(raised.value)
    assert not raised.value.disk_full


def test_a_file_that_is_not_a_database_is_refused_as_damaged(path: Path) -> None:
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match=f"{path}.* is damaged"):
        EventStore(path, "node-a")


def test_a_damaged_database_cannot_be_used_as_it_is(path: Path) -> None:
    path.write_bytes(b"not a database, not at all " * 100)
    with pytest.raises(StoreError) as raised:
        EventStore(path, "node-a")
    assert raised.value.unusable and not raised.value.busy and not raised.value.disk_full
    assert "move it aside" in str(raised.value)


def test_a_directory_in_place_of_the_database_is_named(path: Path) -> None:
    path.mkdir()
    with pytest.raises(StoreError) as raised:
        EventStore(path, "node-a")
    assert str(raised.value) == (
        f"cannot open the event log {path}: it is a directory, not a database file; move it "
        "aside to start with an empty log"
    )
    assert raised.value.unusable


def test_a_database_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "exod.db"
    with pytest.raises(StoreError, match=f"cannot open the event log {missing}"):
        EventStore(missing, "node-a")


def test_an_event_that_does_not_parse_is_reported_with_its_seq(store: EventStore) -> None:
    store.append(started())
    store.append(started())
    with closing(raw(store.path)) as conn:
        conn.execute("UPDATE events SET payload = ? WHERE seq = 2", [b"\xff\xff"])
    assert len(store.read(limit=1)) == 1
    with pytest.raises(StoreError, match="event 2 does not parse"):
        store.read()


def test_a_full_disk_is_a_store_error_the_daemon_can_retry(store: EventStore) -> None:
    store.append(started())
    # Cap the file at its current size: SQLite then fails exactly as on a full disk. Reaching
    # into the store is the only way to set a per-connection limit on its connection.
    conn = store._db.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big = pb.Event(model_added=pb.ModelAdded(name="m", path="/p" * 5000))
    with pytest.raises(StoreError, match="disk is full") as raised:
        for _ in range(10):
            store.append(big)
    assert raised.value.disk_full
    assert str(store.path) in str(raised.value)
    full_count = store.count()  # still readable while full
    store.check()

    conn.execute("PRAGMA max_page_count = 1000000")  # space freed
    record = store.append(big)
    assert record.origin_seq == full_count + 1  # the failed append took no origin_seq
    assert store.count() == full_count + 1


def test_a_locked_database_is_reported_after_a_short_wait(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.1)
    with EventStore(path, "node-a") as store, closing(raw(path)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreError, match="locked by another process") as raised:
            store.append(started())
        assert not raised.value.disk_full
        assert raised.value.busy and not raised.value.unusable
        other.execute("ROLLBACK")
        assert store.append(started()).origin_seq == 1


def test_check_passes_on_an_open_store_and_fails_once_closed(path: Path) -> None:
    store = EventStore(path, "node-a")
    store.check()
    store.close()
    with pytest.raises(StoreError, match=str(path)):
        store.check()
    store.close()  # closing twice is harmless
