"""Ending a rank whose ring never forms, or breaks: promptly, with its reason, never hanging.

MLX cannot be relied on for either:
  - its ring init waits for a missing peer forever, holding the GIL, so no thread of the runner
    can act meanwhile: a small watcher *process* (`python -m exod.runners.ring_watch`, started
    by deadline()) waits for Rank.ring_timeout_s, and unless told the ring formed (its stdin
    closes), sends the RunnerError down the runner's pipe itself and kills the runner;
  - when a peer dies, MLX fails the ring's pending work, but what waits on it may wait forever
    (an mx.synchronize, an async_eval of the next step; seen here in most tries). So a thread
    (Watch) looks at the ring's own TCP connections a few times a second, as the OS sees them:
    once one is no longer established (the peer's end closed: its process died), the rank
    ends. A rank whose peer's machine vanishes without closing anything is exod's to end (the
    peer connection's timeout), not this watch's.

Whichever notices first, the main thread (an error from MLX) or the watch, ends the rank once
(Ending): rank 0 fails each request it still owes, then every rank sends its RunnerError and
exits 75, at once, whatever the main thread is stuck in.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

import psutil

from exod.errors import REASONS, ExoError
from exod.proto.exo.v1 import runner_pb2
from exod.runners.channel import Channel
from exod.runners.pipe import write_message_sync

log = logging.getLogger("exod.runner")

POLL_S = 0.25

Address = tuple[str, int]
Connection = tuple[Address, Address]  # (local, remote)


class Ending:
    """The end of a rank, once, from whichever thread gets there first."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.owed: Callable[[], list[str]] = list  # the requests rank 0 still answers for
        self._once = threading.Lock()

    def __call__(self, error: ExoError) -> NoReturn:
        self._once.acquire()  # never released: a second caller waits for the exit
        log.error("%s", error.message)
        try:
            owed = self.owed()
        except RuntimeError:  # the main thread changed the batch while it was read: no matter,
            owed = []  # the daemon fails whatever the runner still owed when it exits
        try:
            for rid in owed:
                self.channel.error(error.reason, error.message, rid)
            self.channel.error(error.reason, error.message)
        except OSError:
            pass  # the daemon is gone; the exit is all that is left to do
        logging.shutdown()
        os._exit(REASONS[error.reason].exit)


# --- a ring that breaks -------------------------------------------------------------------------


def parse_host(host: str) -> Address:
    address, _, port = host.rpartition(":")
    return _normal(address.strip("[]")), int(port)


def _normal(ip: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 as IPv4."""
    try:
        parsed = ipaddress.ip_address(ip.split("%", maxsplit=1)[0])
    except ValueError:
        return ip
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def ring_connections(
    connections: Sequence[tuple[Connection, str]], hosts: Sequence[str], rank: int
) -> set[Connection]:
    """Of a process's TCP connections (with their states), the established ones of its ring:
    accepted on its own ring address, or made to a peer's."""
    own = parse_host(hosts[rank])
    peers = {parse_host(h) for i, h in enumerate(hosts) if i != rank}
    return {
        (local, remote)
        for (local, remote), status in connections
        if status == psutil.CONN_ESTABLISHED and (local == own or remote in peers)
    }


def broken(watched: set[Connection], now: Sequence[tuple[Connection, str]]) -> bool:
    """Whether any watched connection is no longer established (closed by the peer, or gone)."""
    established = {c for c, status in now if status == psutil.CONN_ESTABLISHED}
    return not watched <= established


def own_connections() -> list[tuple[Connection, str]]:
    found: list[tuple[Connection, str]] = []
    for c in psutil.Process().net_connections(kind="tcp"):
        if c.laddr and c.raddr:
            local = (_normal(c.laddr.ip), c.laddr.port)
            remote = (_normal(c.raddr.ip), c.raddr.port)
            found.append(((local, remote), c.status))
    return found


class Watch:
    """A thread that ends the rank once one of its ring's connections closes."""

    def __init__(self, rank: runner_pb2.Rank, end: Callable[[ExoError], NoReturn]) -> None:
        self.rank = rank
        self.end = end
        self.watched = ring_connections(own_connections(), rank.hosts, rank.rank)
        if not self.watched:
            log.warning("rank %d: no ring connection found to watch", rank.rank)

    def start(self) -> None:
        if self.watched:
            threading.Thread(target=self._run, name="ring-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(POLL_S)
            try:
                now = own_connections()
            except psutil.Error:
                log.exception("cannot list the ring's connections")
                continue
            if broken(self.watched, now):
                self.end(
                    ExoError(
                        "rank_failed",
                        f"rank {self.rank.rank} of {self.rank.size}: a peer closed its ring "
                        "connection: another rank of this model stopped; run again to start "
                        "every rank anew",
                    )
                )


# --- a ring that does not form ------------------------------------------------------------------


def deadline(channel_fd: int, timeout_s: float, error: ExoError) -> Callable[[], None]:
    """Start the watcher process; returns what to call once the ring has formed (in time)."""
    read_end, write_end = os.pipe()
    args = [sys.executable, "-m", "exod.runners.ring_watch", "--fd", str(channel_fd)]
    args += ["--runner", str(os.getpid()), "--timeout", str(timeout_s)]
    args += ["--reason", error.reason, "--message", error.message]
    watcher = subprocess.Popen(args, stdin=read_end, pass_fds=[channel_fd])
    os.close(read_end)

    def formed() -> None:
        os.close(write_end)  # EOF: the watcher exits without a word
        watcher.wait()

    return formed


def watch_formation(args: argparse.Namespace) -> int:
    """The watcher process: the runner's RunnerError and SIGKILL, unless stdin closes first."""
    ready, _, _ = select.select([sys.stdin.fileno()], [], [], args.timeout)
    if ready:
        return 0  # the ring formed, or the runner is gone: either way, nothing to do
    error = runner_pb2.RunnerError(reason=args.reason, message=args.message)
    pipe = socket.socket(fileno=args.fd)
    with contextlib.suppress(OSError):  # the daemon is gone: the runner is about to be, too
        write_message_sync(pipe, runner_pb2.FromRunner(error=error), threading.Lock())
    # The runner is stuck in MLX's ring init, holding the GIL: only a signal ends it.
    os.kill(args.runner, signal.SIGKILL)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exod.runners.ring_watch")
    parser.add_argument("--fd", type=int, required=True, help="the runner's end of its pipe")
    parser.add_argument("--runner", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--reason", required=True)
    parser.add_argument("--message", required=True)
    return watch_formation(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
