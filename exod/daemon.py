"""The composition root: take the home, replay the log, close what died with the last exod, serve.

Order matters and is the contract: nothing is served until the log is replayed and every runner
and run that the log says was alive has been closed, so `exoctl status` never shows a ghost.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from exod import __version__
from exod.config import Settings
from exod.control import server as control_server
from exod.control.service import ControlService, Node
from exod.errors import Exit
from exod.eventlog import EventStore, StoreError, alive_runners, replay
from exod.journal import Journal
from exod.openai import server as openai_server
from exod.proto.exo.v1 import events_pb2
from exod.runners import process
from exod.runners.cgroup import MemoryCgroups
from exod.runners.supervisor import Supervisor
from exod.runs import Runs
from exod.service.localnet import LocalNetwork
from exod.service.notify import Notifier
from exod.service.selfcheck import DEFAULT_PERIOD_S, SelfCheck

log = logging.getLogger("exod")


class Refused(Exception):
    """exod cannot start; carries the exit code and a one-line reason."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def hold_home(home: Path) -> Iterator[IO[str]]:
    """An exclusive lock on the home for as long as this exod lives; the holder's pid inside."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(home / "exod.lock", "a+")  # noqa: SIM115  # held open for the daemon's lifetime
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise Refused(
                Exit.TEMPFAIL,
                f"another exod (pid {holder}) already uses {home}: stop it first, "
                "or give this one another EXOD_HOME",
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield lock
    finally:
        lock.close()


def read_or_create(path: Path, make: str) -> str:
    """A small identity file: created once, then read forever (node id, prompt secret)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(make + "\n")
        tmp.replace(path)
        return make


def close_interrupted(journal: Journal) -> None:
    """Close every runner and run that the log says was alive: they died with the last exod."""
    for view in alive_runners(journal.state):
        if process.same_process(view.pid, view.start_time):
            survivors = process.kill_group_now(view.pid)
            log.warning("ended runner %s (pid %d) left by the last exod", view.id, view.pid)
            if survivors:
                log.error("runner %s survived SIGKILL: %s", view.id, survivors)
        failed = events_pb2.RunnerFailed(
            runner_id=view.id,
            reason="interrupted",
            detail="exod stopped while this runner was alive; closed when exod started again",
        )
        journal.append(events_pb2.Event(runner_failed=failed))
    for run in list(journal.state.runs.values()):
        finished = events_pb2.RunFinished(
            run_id=run.id, stop_reason="interrupted", reason="interrupted"
        )
        journal.append(events_pb2.Event(run_finished=finished))


def open_journal(settings: Settings, node_id: str) -> Journal:
    """Open the log, replay it, and close what died with the last exod."""
    try:
        store = EventStore(settings.home / "exod.db", node_id)
    except StoreError as e:
        raise Refused(Exit.INTERNAL, str(e)) from e
    try:
        started = time.monotonic()
        journal = Journal(store, replay(store), settings.snapshot_every)
        log.info("replayed %d events in %.3fs", journal.state.last_seq, time.monotonic() - started)
        close_interrupted(journal)
        started_event = events_pb2.NodeStarted(
            version=__version__, pid=os.getpid(), hostname=socket.gethostname()
        )
        journal.append(events_pb2.Event(node_started=started_event))
    except StoreError as e:
        store.close()
        raise Refused(Exit.INTERNAL, str(e)) from e
    except BaseException:
        store.close()
        raise
    return journal


async def serve(settings: Settings) -> None:
    # systemd's NOTIFY_SOCKET and WATCHDOG_USEC, if it started us (a no-op otherwise).
    notifier = Notifier.from_environ(os.environ)
    notifier.status("replaying the event log")
    node_id = read_or_create(settings.home / "node_id", "n-" + secrets.token_hex(6))
    secret = bytes.fromhex(read_or_create(settings.home / "secret", secrets.token_hex(32)))
    journal = open_journal(settings, node_id)
    try:
        supervisor = Supervisor(journal, settings, MemoryCgroups.setup())
        runs = Runs(settings, journal, supervisor, secret)
        node = Node(id=node_id, started=time.time(), localnet=LocalNetwork())
        await serve_until_stopped(settings, node, runs, notifier)
        try:
            journal.append(events_pb2.Event(node_stopped=events_pb2.NodeStopped(reason="signal")))
        except StoreError as e:
            # A full disk must not turn a clean stop into a crash; the next start sees no
            # NodeStopped, which is exactly what it would see after a crash.
            log.error("could not record NodeStopped: %s", e)
        log.info("stopped")
    finally:
        journal.store.close()


async def serve_until_stopped(
    settings: Settings, node: Node, runs: Runs, notifier: Notifier
) -> None:
    """Listen on every endpoint, enforce limits, and on SIGTERM drain: runners first."""
    try:
        http = await openai_server.start(settings, runs)
    except openai_server.CannotServe as e:
        raise Refused(e.code, str(e)) from e
    try:
        server, checker = await control_server.start(settings.socket, ControlService(node, runs))
    except control_server.SocketInUse as e:
        raise Refused(Exit.TEMPFAIL, f"{e}: is another exod using it?") from e
    except RuntimeError as e:
        raise Refused(Exit.CONFIG, f"cannot listen on {settings.socket}: {e}") from e
    log.info("exod %s serving on %s (node %s)", __version__, settings.socket, node.id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervisor = runs.supervisor
    enforcer = asyncio.create_task(supervisor.watch())
    # Ready only now: the log is replayed and the socket accepts connections.
    notifier.ready(f"serving on {settings.socket}")
    health = SelfCheck.for_store(runs.journal.store, notifier.watchdog or DEFAULT_PERIOD_S).start(
        notifier, lambda ok: control_server.set_serving(checker, ok)
    )
    await stop.wait()
    notifier.stopping(f"stopping: ending {len(supervisor.runners)} runner(s)")
    log.info("stopping: ending runners")
    enforcer.cancel()
    health.cancel()
    await control_server.set_serving(checker, False)
    http.close()  # no new requests; those in flight end with their runs, just below
    await supervisor.shutdown()
    await http.wait_closed()
    await server.stop(grace=1.0)
    with contextlib.suppress(FileNotFoundError):
        settings.socket.unlink()


def run(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s exod[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    os.umask(0o077)  # everything exod writes (log, socket, identity) is its user's alone
    try:
        with hold_home(settings.home):
            asyncio.run(serve(settings))
    except Refused as e:
        print(f"exod: {e}", file=sys.stderr)
        return int(e.code)
    return 0
