"""The composition root: take the home, replay the log, close what died with the last exod, serve.

Order matters and is the contract: nothing is served until the log is replayed and every runner
and run that the log says was alive has been closed, so `exoctl status` never shows a ghost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1._async import HealthServicer

from exod import __version__, config
from exod.cluster import tls_store
from exod.cluster.control import CannotListen, Cluster, tls_dir
from exod.cluster.discovery import DiscoveryError
from exod.cluster.finder import Finder
from exod.cluster.instances import Instances
from exod.cluster.planning import Planner
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
from exod.service import localnet
from exod.service.awake import KeepAwake
from exod.service.localnet import LocalNetwork
from exod.service.notify import Notifier
from exod.service.selfcheck import DEFAULT_PERIOD_S, SelfCheck

log = logging.getLogger("exod")


class Refused(Exception):
    """exod cannot start; carries the exit code and a one-line reason."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code


HOME_FIX = "set EXOD_HOME or --home to a directory that {user} can write"
SOCKET_FIX = "set EXOD_SOCKET or --socket to a path in a directory that {user} can write"
IN_HOME_FIX = "move it aside, or set EXOD_HOME or --home to another directory"


def path_problem(path: Path, err: OSError) -> str:
    """What stands in the way of `path`, in words: the part of it that is a file, the directory
    this user may not write, the read-only file system. `err` is what the attempt raised."""
    target = Path(err.filename) if isinstance(err.filename, str) else path
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        # A directory was expected; find the first part of the path that is something else.
        for part in (*reversed(target.parents), target):
            if os.path.lexists(part) and not part.is_dir():
                return f"{part} is {'a file, ' if part.is_file() else ''}not a directory"
    if err.errno == errno.EISDIR:
        return f"{target} is a directory"
    where = next((p for p in (target, *target.parents) if os.path.lexists(p)), target)
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"user {config.user_name()} may not write to {where}"
    if err.errno == errno.EROFS:
        return f"{where} is on a read-only file system"
    return f"{err.strerror or err} ({target})"


def cannot(doing: str, path: Path, err: OSError, fix: str) -> Refused:
    """The refusal for a path exod cannot use at start: 75 for a full disk, else 78 (only a
    person can fix a file in the way or a permission, so a service manager must not retry)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return Refused(Exit.TEMPFAIL, f"cannot {doing} {path}: the disk is full; free some space")
    why = path_problem(path, err)
    return Refused(
        Exit.CONFIG, f"cannot {doing} {path}: {why}; {fix.format(user=config.user_name())}"
    )


@contextlib.contextmanager
def hold_home(home: Path) -> Iterator[IO[str]]:
    """An exclusive lock on the home for as long as this exod lives; the holder's pid inside."""
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise cannot("create its home", home, e, HOME_FIX) from None
    try:
        lock = open(home / "exod.lock", "a+")  # noqa: SIM115  # held open for the daemon's life
    except OSError as e:
        fix = IN_HOME_FIX if e.errno == errno.EISDIR else HOME_FIX
        raise cannot("write in its home", home, e, fix) from None
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


def read_or_create(path: Path, make: str, valid: Callable[[str], bool]) -> str:
    """A small identity file: created once, then read forever (node id, prompt secret)."""
    try:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(make + "\n")
            tmp.replace(path)
            return make
    except OSError as e:
        raise cannot("read or create", path, e, IN_HOME_FIX) from None
    except UnicodeDecodeError:
        text = ""
    if not valid(text):
        raise Refused(
            Exit.CONFIG,
            f"{path} is damaged (it is not what exod wrote there); restore it from a backup, "
            "or move it aside and exod makes a new one",
        )
    return text


def valid_node_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9._-]+", text))


def valid_secret(text: str) -> bool:
    return bool(re.fullmatch(r"(?:[0-9a-f]{2})+", text))


def store_exit(e: StoreError) -> Exit:
    """The exit code for an event log that cannot be opened or replayed at start."""
    if e.disk_full or e.busy:
        return Exit.TEMPFAIL
    # A damaged or unwritable file is not a bug of exod (70) and does not heal by itself:
    # 78, so that a service manager waits for the person the message asks to act.
    return Exit.CONFIG if e.unusable else Exit.INTERNAL


def check_socket_path(path: Path) -> None:
    """Refuse a socket path exod cannot listen on, before the log is opened: its directory
    cannot be made, or a file or directory stands where the socket goes (clearing a stale socket
    must never delete a user's file)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise cannot("listen on", path, e, SOCKET_FIX) from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        # gRPC would find out only when it binds, after the log is replayed, and would say it
        # in a line of its own on stderr.
        code = errno.EROFS if os.statvfs(path.parent).f_flag & os.ST_RDONLY else errno.EACCES
        err = OSError(code, os.strerror(code), str(path.parent))
        raise cannot("listen on", path, err, SOCKET_FIX)
    with contextlib.suppress(FileNotFoundError):
        mode = path.lstat().st_mode
        if not (stat.S_ISSOCK(mode) or stat.S_ISLNK(mode)):
            what = "a directory" if stat.S_ISDIR(mode) else "a file"
            raise Refused(
                Exit.CONFIG,
                f"cannot listen on {path}: it is {what}, not a socket; move it aside, or set "
                "EXOD_SOCKET or --socket to another path",
            )


def _claim_socket(path: Path) -> None:
    """Clear a stale socket at path; Refused when another server listens there."""
    try:
        control_server.prepare_socket(path)
    except OSError as e:
        raise cannot("listen on", path, e, SOCKET_FIX) from e
    except control_server.SocketInUse as e:
        raise Refused(Exit.TEMPFAIL, f"{e}: is another exod using it?") from e


async def _listen(path: Path, control: ControlService) -> tuple[grpc.aio.Server, HealthServicer]:
    """Start answering exoctl on the control socket (_claim_socket has cleared it)."""
    try:
        return await control_server.start(path, control)
    except OSError as e:
        raise cannot("listen on", path, e, SOCKET_FIX) from e
    except RuntimeError as e:  # gRPC's bind failure; check_socket_path caught the usual causes
        fix = SOCKET_FIX.format(user=config.user_name())
        raise Refused(Exit.CONFIG, f"cannot listen on {path}: {e}; {fix}") from e


def close_interrupted(journal: Journal) -> None:
    """Close every runner, run and split model's instance that the log says was alive: they
    died with the last exod."""
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
    for instance_id, model in list(journal.state.instances.items()):
        ended = events_pb2.InstanceEnded(
            instance_id=instance_id,
            reason="interrupted",
            message=f"exod stopped while instance {instance_id} ({model}) ran; its members "
            "ended their ranks when its lease lapsed (EXOD_PEER_TIMEOUT): run it again",
        )
        journal.append(events_pb2.Event(instance_ended=ended))


def open_journal(settings: Settings, node_id: str) -> Journal:
    """Open the log, replay it, and close what died with the last exod."""
    try:
        store = EventStore(settings.home / "exod.db", node_id)
    except StoreError as e:
        raise Refused(store_exit(e), str(e)) from e
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
        raise Refused(store_exit(e), str(e)) from e
    except BaseException:
        store.close()
        raise
    return journal


async def serve(settings: Settings) -> None:
    # systemd's NOTIFY_SOCKET and WATCHDOG_USEC, if it started us (a no-op otherwise).
    notifier = Notifier.from_environ(os.environ)
    notifier.status("replaying the event log")
    check_socket_path(settings.socket)
    node_id = read_or_create(settings.home / "node_id", "n-" + secrets.token_hex(6), valid_node_id)
    secret_hex = read_or_create(settings.home / "secret", secrets.token_hex(32), valid_secret)
    secret = bytes.fromhex(secret_hex)
    try:
        # Read before the log: damaged cluster files refuse the start at once (78).
        material = tls_store.load(tls_dir(settings))
    except tls_store.TlsStoreError as e:
        raise Refused(Exit.TEMPFAIL if e.disk_full else Exit.CONFIG, str(e)) from e
    journal = open_journal(settings, node_id)
    awake = KeepAwake.for_this_machine(settings.keep_awake)
    try:
        supervisor = Supervisor(journal, settings, MemoryCgroups.setup())
        cluster = Cluster(settings, node_id, journal, material, supervisor)
        planner = Planner(settings, node_id, cluster, supervisor, journal)
        instances = Instances(
            settings, node_id, journal, supervisor, cluster=cluster, planner=planner
        )
        if cluster.ranks is not None:
            cluster.ranks.coordinating = instances.coordinating
        runs = Runs(settings, journal, supervisor, secret, awake, instances=instances)
        node = Node(
            id=node_id,
            started=time.time(),
            localnet=LocalNetwork(),
            cluster=cluster,
            instances=instances,
        )
        localnet.watch_mdns_sends(node.localnet)  # macOS's denial shows as failed sends
        await serve_until_stopped(settings, node, runs, notifier)
        try:
            journal.append(events_pb2.Event(node_stopped=events_pb2.NodeStopped(reason="signal")))
        except StoreError as e:
            # A full disk must not turn a clean stop into a crash; the next start sees no
            # NodeStopped, which is exactly what it would see after a crash.
            log.error("could not record NodeStopped: %s", e)
        log.info("stopped")
    finally:
        awake.close()  # whichever way serving ended
        journal.store.close()


async def serve_until_stopped(
    settings: Settings, node: Node, runs: Runs, notifier: Notifier
) -> None:
    """Listen on every endpoint, enforce limits, and on SIGTERM drain: runners first."""
    # Before anything listens: a SIGTERM that comes while exod starts (the HTTP port may already
    # answer while mDNS starts) must stop it cleanly once started, not end it where it stands.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        http = await openai_server.start(settings, runs)
    except openai_server.CannotServe as e:
        raise Refused(e.code, str(e)) from e
    finder = Finder(
        node.id,
        node.cluster,
        runs.journal,
        port=settings.peer_port,
        bind=settings.peer_bind,
        interfaces=settings.mdns_interfaces,
    )
    try:
        # The control socket accepts last, so that whoever finds exod answering (`exoctl status
        # --wait`, a script, a test) finds all of it: a member's peer and join ports listening,
        # mDNS announcing. Another server on the socket is still the first thing reported.
        _claim_socket(settings.socket)
        # A member listens on its peer port again; a node in no cluster listens on none.
        await node.cluster.start()
        # mDNS pinned to an address this machine lacks is a setting to fix: refuse to start.
        await finder.start()
        control = ControlService(node, runs)
        server, checker = await _listen(settings.socket, control)
    except BaseException as e:
        await finder.stop()
        await node.cluster.stop()
        http.close()
        if isinstance(e, CannotListen | DiscoveryError):
            raise Refused(Exit.CONFIG, str(e)) from e
        raise
    log.info("exod %s serving on %s (node %s)", __version__, settings.socket, node.id)
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
    # mDNS says goodbye meanwhile: the others see this node leave at once.
    await asyncio.gather(
        node.instances.shutdown(),
        supervisor.shutdown(),
        control.shutdown(),
        finder.stop(),
        node.cluster.stop(),
    )
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
