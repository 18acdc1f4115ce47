"""Run the real exod and the real exoctl as a user would, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Unix socket paths must stay short (about 104 bytes on macOS): pytest's tmp_path is too long.
SOCKET_ROOT = Path(tempfile.gettempdir())


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


@dataclass
class Daemon:
    """One exod process on its own home; `exoctl()` talks to it through its socket."""

    home: Path
    socket: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @classmethod
    def create(cls, home: Path, **env: str) -> Daemon:
        return cls(home=home, socket=short_dir() / "exod.sock", env=env)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXOD_")}
        env.update({"EXOD_HOME": str(self.home), "EXOD_SOCKET": str(self.socket)})
        env.update(self.env)
        return env

    def start(self, *args: str, wait: bool = True) -> Daemon:
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
                if "exod.runners.runner" in cmd and env.get("EXOD_HOME") == str(self.home):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        found.append(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def exoctl(
        self,
        *args: str,
        input: bytes | None = None,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "exoctl", *args],
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
            env={**self.base_env(), **(env or {})},
        )
        return Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGTERM)
        for pid in self.runner_pids():
            # A leak is a test failure elsewhere; here we only make sure nothing outlives the test.
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def pids_alive(pids: Sequence[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive
