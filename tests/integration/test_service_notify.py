"""exod under a service manager: this test plays systemd's part of the notify protocol.

It gives exod a NOTIFY_SOCKET and a WATCHDOG_USEC, as systemd does for `Type=notify` with
`WatchdogSec=`, and checks what systemd relies on: READY=1 only once exod answers, WATCHDOG=1 at
half the watchdog interval while exod is healthy and none while its database is held, and
STOPPING=1 then exit 0 on SIGTERM with every runner ended.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.daemon import Daemon, pids_alive, short_dir, wait_until

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s: quick enough to count, slow enough to be steady
PERIOD_S = WATCHDOG_USEC / 2 / 1e6
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def accepts(path: Path) -> bool:
    """Whether a connection to the Unix socket at `path` is accepted (by the kernel: a listening
    socket takes it into its backlog even while its process is stopped)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@dataclass
class Manager:
    """The receiving end of NOTIFY_SOCKET: every datagram, with when it arrived.

    On READY=1 it freezes the daemon (SIGSTOP) and notes whether the control socket accepts
    connections at that moment, so that a READY sent too early is caught however fast exod is.
    """

    path: Path
    control: Path
    pid: int = 0
    accepted_at_ready: bool | None = None
    received: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._lock = threading.Lock()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if "READY" in fields and self.pid:
                os.kill(self.pid, signal.SIGSTOP)
                self.accepted_at_ready = accepts(self.control)
                os.kill(self.pid, signal.SIGCONT)
            with self._lock:
                self.received.append((time.monotonic(), fields))

    def close(self) -> None:
        self._sock.close()

    def messages(self, key: str, since: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, m) for t, m in self.received if key in m and t > since]

    def wait_for(self, key: str, since: float = 0.0, timeout: float = 30.0) -> float:
        """When the first message with `key` after `since` arrived."""
        assert wait_until(lambda: bool(self.messages(key, since)), timeout), (
            f"no {key} within {timeout}s; got {self.received}"
        )
        return self.messages(key, since)[0][0]


def health(sock: Path, service: str = "") -> int:
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    status: int = reply.status
    return status


def both_health(sock: Path) -> tuple[int, int]:
    return health(sock), health(sock, "exo.v1.Control")


def test_exod_speaks_the_notify_protocol_and_its_watchdog_follows_its_health(
    tmp_path: Path, daemon_factory: list[Daemon], qwen2: Path
) -> None:
    where = short_dir()
    d = Daemon.create(tmp_path / "home", WATCHDOG_USEC=str(WATCHDOG_USEC))
    manager = Manager(where / "notify", d.socket)
    d.env["NOTIFY_SOCKET"] = str(manager.path)
    daemon_factory.append(d)
    try:
        d.start(wait=False)
        manager.pid = d.pid

        # READY=1 comes once exod answers: its socket accepted connections when it was sent.
        manager.wait_for("READY")
        assert manager.accepted_at_ready is True
        assert both_health(d.socket) == (SERVING, SERVING)
        statuses = [m["STATUS"] for _, m in manager.messages("STATUS")]
        assert statuses[0] == "replaying the event log"
        assert statuses[1] == f"serving on {d.socket}"

        # A runner, so that stopping has something to end. It must not see the manager's socket.
        d.ok("run", str(qwen2), "Hello", "--max-tokens", "2")
        runners = d.runner_pids()
        assert runners
        assert not [p for p in runners if "NOTIFY_SOCKET" in psutil.Process(p).environ()]

        # Healthy: WATCHDOG=1 every half WATCHDOG_USEC, never a gap systemd would act on.
        start = time.monotonic()
        time.sleep(3.0)
        pings = [t for t, _ in manager.messages("WATCHDOG", since=start)]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 4, pings
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
        assert 0.7 * PERIOD_S < sum(gaps) / len(gaps) < 1.5 * PERIOD_S, gaps

        # Someone else holds the database: health goes NOT_SERVING and the pings stop.
        holder = sqlite3.connect(d.home / "exod.db", isolation_level=None, timeout=5)
        holder.execute("BEGIN EXCLUSIVE")
        assert wait_until(lambda: both_health(d.socket) == (NOT_SERVING, NOT_SERVING), 5.0)
        wedged = time.monotonic()
        time.sleep(4 * PERIOD_S)
        assert manager.messages("WATCHDOG", since=wedged) == []
        (_, failing), *_ = [
            (t, m) for t, m in manager.messages("STATUS") if m["STATUS"].startswith("not serving")
        ]
        assert "database" in failing["STATUS"], failing

        # Let go: serving and pinging again.
        holder.execute("COMMIT")
        holder.close()
        released = time.monotonic()
        manager.wait_for("WATCHDOG", since=released, timeout=5.0)
        assert both_health(d.socket) == (SERVING, SERVING)

        # SIGTERM: STOPPING=1, every runner ended, exit 0.
        stopping = time.monotonic()
        assert d.stop() == 0, d.log()
        manager.wait_for("STOPPING", since=stopping, timeout=1.0)
        assert d.runner_pids() == []
        assert pids_alive(runners) == []
    finally:
        manager.close()
        shutil.rmtree(where, ignore_errors=True)

    # The drain is in the log: the runner stopped for the daemon, then the node stopped.
    d.start()
    events = d.events()
    stopped = [e for e in events if e["kind"] == "RunnerStopped"]
    assert [e["reason"] for e in stopped] == ["daemon_stopped"]
    assert [e["kind"] for e in events].count("NodeStopped") == 1
