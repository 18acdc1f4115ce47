"""Run the real exod and the real exoctl as a user would, for integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import grpc
import psutil

from exoctl import render
from exoctl.client import Client
from exoctl.failures import Failure
from exod.proto.exo.v1 import control_pb2

# Unix socket paths must stay short (about 104 bytes on macOS): pytest's tmp_path is too long.
SOCKET_ROOT = Path(tempfile.gettempdir())

# Runner states that claim a live process: the supervisor's (loading, ready, running, stopping)
# and the fold's for a runner the log says is alive (spawning, ready).
ALIVE_STATES = frozenset({"spawning", "loading", "ready", "running", "stopping"})

Event = dict[str, Any]


def _parsed(obj: dict[str, Any]) -> dict[str, Any]:
    """obj as exoctl prints it and a script reads it back (tuples become lists, and so on)."""
    parsed: dict[str, Any] = json.loads(render.json_line(obj))
    return parsed


def short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="exo", dir=SOCKET_ROOT))


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode()

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout.decode().splitlines()]

    def __str__(self) -> str:
        return f"exit {self.code}, stdout {self.stdout[:300]!r}, stderr {self.stderr[-600:]!r}"


@dataclass
class Daemon:
    """One exod process on its own home; `exoctl()` talks to it through its socket."""

    home: Path
    socket: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def create(cls, home: Path, **env: str) -> Daemon:
        return cls(home=home, socket=short_dir() / "exod.sock", env=env)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXOD_")}
        env.update({"EXOD_HOME": str(self.home), "EXOD_SOCKET": str(self.socket)})
        # No test binds the HTTP API's default port: the tests of the API pick a free one.
        env["EXOD_HTTP_PORT"] = "0"
        # A member announces itself by mDNS: never on the host's network from a test (the
        # namespace tests pin it to their own links).
        env["EXOD_MDNS_INTERFACES"] = "127.0.0.1"
        env.update(self.env)
        return env

    # --- exod ---------------------------------------------------------------------------------

    def start(self, *args: str, wait: bool = True) -> Daemon:
        """Start exod on this home (again, after stop(): the same home and socket)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home.parent / f"{self.home.name}-exod.log"
        log = open(self.log_path, "ab")  # noqa: SIM115  # the daemon writes it for its lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exod", *args],
            env=self.base_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exod exited {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(self.socket))
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            time.sleep(0.05)
        raise AssertionError(f"exod did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal exod and wait for it; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"exod did not exit within {timeout}s of {sig.name}") from None

    def runner_pids(self) -> list[int]:
        """Live runner processes of this exod (by their command line and home)."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            try:
                cmd = proc.info["cmdline"] or []
                env = proc.info["environ"] or {}
                ours = "exod.runners.runner" in cmd and env.get("EXOD_HOME") == str(self.home)
                if ours and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    # --- exoctl -------------------------------------------------------------------------------

    def exoctl(
        self,
        *args: str,
        input: bytes | None = None,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "exoctl", *args],
            check=False,
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
            env={**self.base_env(), **(env or {})},
        )
        return Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))

    def exoctl_bg(
        self, *args: str, stdout: int | IO[bytes] = subprocess.PIPE
    ) -> subprocess.Popen[bytes]:
        """exoctl in the background (stdin empty, stderr piped); cleanup() ends it if a test
        does not."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "exoctl", *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=self.base_env(),
        )
        self.clients.append(proc)
        return proc

    def ok(self, *args: str, input: bytes | None = None) -> Result:
        """exoctl that must succeed."""
        result = self.exoctl(*args, input=input)
        assert result.code == 0, f"exoctl {' '.join(args)}: {result}\n{self.log()[-3000:]}"
        return result

    # status() and events() are what `exoctl status --json` and `exoctl events --json` print,
    # made by exoctl's own client and rendering over the real socket, but in this process: tests
    # poll them thousands of times, and a Python process per poll was a sixth of the suite's
    # time. Tests of those commands run them; test_status_events checks that the two agree.

    def events(self, since: int = 0) -> list[Event]:
        """`exoctl events --json --since SINCE`, parsed."""
        request = control_pb2.EventsRequest(since=since)
        with self._client() as client:
            try:
                records = list(client.events(request))
            except grpc.RpcError as e:
                raise AssertionError(f"events: {e}\n{self.log()[-3000:]}") from None
        return [_parsed(render.event_json(r)) for r in records]

    def last_seq(self) -> int:
        events = self.events()
        return int(events[-1]["seq"]) if events else 0

    def status(self) -> dict[str, Any]:
        """`exoctl status --json`, parsed."""
        with self._client() as client:
            return _parsed(render.status_json(client.status()))

    @contextlib.contextmanager
    def _client(self) -> Iterator[Client]:
        try:
            with Client(Path(self.base_env()["EXOD_SOCKET"])) as client:
                yield client
        except Failure as e:
            raise AssertionError(f"exit {e.code}: {e.message}\n{self.log()[-3000:]}") from None

    def wait_event(
        self, match: Callable[[Event], bool], *, since: int = 0, timeout: float = 15.0
    ) -> Event:
        """The first event after `since` that matches, waiting up to `timeout` for it."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events(since):
                if match(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event within {timeout}s:\n{self.events(since)}")
            time.sleep(0.1)

    def cleanup(self) -> list[int]:
        """End the clients and exod; returns the runners that outlived exod (a leak), killed."""
        for client in self.clients:
            if client.poll() is None:
                client.kill()
            client.wait()
            for stream in (client.stdout, client.stderr):
                if stream is not None:
                    stream.close()
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGTERM)
        # exod ends its runners before it exits; after a SIGKILL their lifeline needs a moment.
        if wait_until(lambda: not self.runner_pids(), timeout=2.0, poll=0.1):
            return []
        leaked = self.runner_pids()
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return leaked


# --- processes --------------------------------------------------------------------------------


Stream = list[tuple[str, int, str]]  # (origin, origin_seq, kind)


def replicated_stream(holder: Daemon, origin: str) -> Stream:
    """`origin`'s replicated events as `holder`'s log holds them, in log order."""
    from exod.cluster.replicated import REPLICATED_KINDS

    events = holder.ok("events", "--json", "--node", origin).json_lines()
    return [
        (e["origin"], e["origin_seq"], e["kind"]) for e in events if e["kind"] in REPLICATED_KINDS
    ]


def pids_alive(pids: Sequence[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def group_alive(pgid: int) -> list[int]:
    """Processes of process group `pgid` that still live (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # the kernel knows no process in the group, not even a zombie
    except PermissionError:
        pass  # someone else's process holds the id: look closer
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return alive


def timestamp(rfc3339: str) -> float:
    """A time as exoctl's JSON writes it (an event's ts, a node's last_seen), as time.time()."""
    return datetime.fromisoformat(rfc3339).timestamp()


def wait_until(check: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    """Whether `check()` became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)


def read_some(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bytes:
    """The first bytes that `proc` writes to its stdout pipe (a token, usually), or fail."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    data = os.read(fd, 65536)
    assert data, f"stdout closed without output; exit {proc.wait()}: {stderr_of(proc)}"
    return data


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None
    return proc.stderr.read().decode(errors="replace")


class LineReader:
    """Lines of a background process's stdout, read by a thread so a test can wait with a
    timeout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in iter(self._stdout.readline, b""):
            self._lines.put(line)

    def next(self, timeout: float = 15.0) -> bytes:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s") from None
