"""The health self-check: is this exod still doing its job? It drives two outside views.

Every period it checks that the event loop turns over on time and that the database answers,
including a probe for its write lock: exod's every decision is an append to the log, so a daemon
whose log cannot be written is not serving even while its sockets answer. A reader would not
notice a writer's lock (the log is in WAL mode), which is why the probe takes the write lock
itself and gives it back at once.

While a check fails, the gRPC health service says NOT_SERVING and no WATCHDOG=1 is sent, so that
systemd restarts an exod that stays wedged for WatchdogSec; once a check passes again, both
resume. A loop that is wedged outright runs no check at all, which stops the pings just the same.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from exod.eventlog import EventStore
from exod.service.notify import Notifier

log = logging.getLogger("exod.selfcheck")

# Without a watchdog, health is still kept honest at this cadence.
DEFAULT_PERIOD_S = 5.0
# The longest the database may take to answer, however long the period: a trivial query that
# takes seconds means something holds the database.
MAX_DB_WAIT_S = 5.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    problem: str = ""  # what failed, in words for the log and `systemctl status`


def judge(db_problem: str | None, lag: float, max_lag: float) -> Verdict:
    """The outcome of one round, from what the database said and how late the loop woke up."""
    if db_problem is not None:
        return Verdict(False, db_problem)
    if lag > max_lag:
        return Verdict(False, f"the event loop was {lag:.1f} s late (limit {max_lag:g} s)")
    return Verdict(True)


def probe_write_lock(path: Path, timeout: float) -> None:
    """Take the database's write lock and give it back; sqlite3.Error when it cannot be had."""
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.close()


class SelfCheck:
    """Runs `check_db` (blocking; raises when the database does not answer) every `period`
    seconds in its own thread, bounded by a timeout, and reports each round."""

    def __init__(self, check_db: Callable[[], None], period: float) -> None:
        self.period = period
        self.timeout = min(period, MAX_DB_WAIT_S)
        self._check_db = check_db
        # One thread: a check that hangs is waited for, never piled up behind a second one.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exod-selfcheck")
        self._inflight: Future[None] | None = None
        self._since = 0.0

    @classmethod
    def for_store(cls, store: EventStore, period: float) -> SelfCheck:
        timeout = min(period, MAX_DB_WAIT_S)

        def check() -> None:
            store.check()  # exod's own connection answers
            probe_write_lock(store.path, timeout)  # and nobody else holds the write lock

        return cls(check, period)

    def start(
        self, notifier: Notifier, set_serving: Callable[[bool], Awaitable[None]]
    ) -> asyncio.Task[None]:
        """run() as a task of the running loop; cancel it to stop."""
        return asyncio.create_task(self.run(notifier, set_serving))

    async def run(self, notifier: Notifier, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """Check, report, repeat until cancelled."""
        loop = asyncio.get_running_loop()
        serving = True  # the server starts SERVING
        due = loop.time()
        try:
            while True:
                lag = max(0.0, loop.time() - due)
                verdict = judge(await self._db_problem(), lag, max_lag=self.period)
                if verdict.ok != serving:
                    serving = verdict.ok
                    await set_serving(serving)
                    if serving:
                        log.warning("self-check passes again: serving")
                        notifier.status("serving")
                    else:
                        log.error("self-check failed, not serving: %s", verdict.problem)
                        notifier.status(f"not serving: {verdict.problem}")
                if verdict.ok:
                    notifier.ping()
                # After a stall, start afresh rather than fire a burst of late rounds.
                due = max(due + self.period, loop.time())
                await asyncio.sleep(due - loop.time())
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _db_problem(self) -> str | None:
        """None when the database answered within the timeout, else what went wrong."""
        if self._inflight is not None and not self._inflight.done():
            waited = time.monotonic() - self._since
            return f"the database has not answered for {waited:.1f} s"
        self._since = time.monotonic()
        self._inflight = self._executor.submit(self._check_db)
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._inflight), self.timeout)
        except TimeoutError:
            return f"the database did not answer within {self.timeout:g} s"
        except Exception as e:  # any failure of the check is the verdict, whatever its kind
            return " ".join(str(e).split()) or type(e).__name__
        return None
