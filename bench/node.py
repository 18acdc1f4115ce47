"""One exod a benchmark starts on a loopback address of its own, and talks to with exoctl."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class BenchNode:
    def __init__(self, work: Path, name: str, address: str, **env: str) -> None:
        self.home = work / name
        self.address = address
        self.port = free_port(address)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EXOD_")},
            "EXOD_HOME": str(self.home),
            "EXOD_SOCKET": str(work / f"{name}.sock"),
            "EXOD_HTTP_PORT": "0",
            # A member announces itself by mDNS: never on the machine's network from a benchmark.
            "EXOD_MDNS_INTERFACES": "127.0.0.1",
            "EXOD_PEER_BIND": address,
            "EXOD_PEER_PORT": str(self.port),
            "EXOD_JOIN_PORT": str(free_port(address)),
            "EXOD_LOG_LEVEL": "warning",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exod"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.exoctl("status", "--wait", "60")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def exoctl(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "exoctl", *args],
            env=self.env,
            capture_output=True,
            check=True,
            text=True,
        )
        return out.stdout
