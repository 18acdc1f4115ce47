"""The self-check's verdicts and what they drive: health and the watchdog pings."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from exod.service.notify import Notifier
from exod.service.selfcheck import SelfCheck, judge, probe_write_lock


def test_judge() -> None:
    assert judge(None, lag=0.1, max_lag=0.5).ok
    assert judge("the database is locked", 0.0, 0.5).problem == "the database is locked"
    late = judge(None, lag=2.0, max_lag=0.5)
    assert not late.ok
    assert late.problem == "the event loop was 2.0 s late (limit 0.5 s)"


def test_the_write_probe_fails_while_another_connection_holds_the_database(
    tmp_path: Path,
) -> None:
    db = tmp_path / "x.db"
    setup = sqlite3.connect(db, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x)")
    probe_write_lock(db, timeout=0.1)
    setup.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        probe_write_lock(db, timeout=0.1)
    setup.execute("COMMIT")
    probe_write_lock(db, timeout=0.1)


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, str]] = []

    def send(self, **fields: str) -> None:
        self.sent.append(fields)


def run_rounds(check: SelfCheck, seconds: float) -> tuple[list[dict[str, str]], list[bool]]:
    """Run the self-check for a while; what it sent and each change of health it made."""
    notifier = Recorder()
    changes: list[bool] = []

    async def set_serving(ok: bool) -> None:
        changes.append(ok)

    async def main() -> None:
        task = asyncio.create_task(check.run(notifier, set_serving))
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(main())
    return notifier.sent, changes


def test_pings_only_while_the_check_passes_and_health_follows() -> None:
    failing = threading.Event()

    def check_db() -> None:
        if failing.is_set():
            raise RuntimeError("database is locked")

    def flip() -> None:
        failing.set()
        threading.Timer(0.3, failing.clear).start()

    threading.Timer(0.3, flip).start()
    sent, changes = run_rounds(SelfCheck(check_db, period=0.05), 0.9)
    assert changes == [False, True]
    failed = sent.index({"STATUS": "not serving: database is locked"})
    recovered = sent.index({"STATUS": "serving"})
    assert sent[:failed].count({"WATCHDOG": "1"}) >= 3  # pings while healthy
    assert {"WATCHDOG": "1"} not in sent[failed:recovered]  # none while failing
    assert sent[recovered:].count({"WATCHDOG": "1"}) >= 3  # and again once it passes


def test_a_check_that_hangs_fails_by_its_timeout_and_is_not_piled_on() -> None:
    release = threading.Event()
    calls = 0

    def check_db() -> None:
        nonlocal calls
        calls += 1
        release.wait(5)

    check = SelfCheck(check_db, period=0.05)
    try:
        sent, changes = run_rounds(check, 0.4)
    finally:
        release.set()
    assert changes == [False]
    assert calls == 1  # later rounds saw the first still hanging and did not start another
    assert {"WATCHDOG": "1"} not in sent
    statuses = [m["STATUS"] for m in sent if "STATUS" in m]
    assert statuses == ["not serving: the database did not answer within 0.05 s"]
