"""The socket: the standard gRPC health check answers, and one exod per home (and socket)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.daemon import Daemon

CONTROL = "exo.v1.Control"


def health(socket: Path, service: str = "") -> int:
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    status: int = reply.status
    return status


def fingerprint(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def run_exod(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exod"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_standard_health_client_gets_serving(exod: Daemon) -> None:
    assert health(exod.socket) == health_pb2.HealthCheckResponse.SERVING
    assert health(exod.socket, CONTROL) == health_pb2.HealthCheckResponse.SERVING


def test_second_exod_on_the_same_home_exits_75_naming_the_first(exod: Daemon) -> None:
    before = fingerprint(exod.socket)
    second = run_exod(exod.base_env())  # the same home and socket
    assert second.returncode == 75, second
    assert f"pid {exod.pid}" in second.stderr
    assert str(exod.home) in second.stderr
    # The first is untouched: same socket file, still serving, same pid.
    assert fingerprint(exod.socket) == before
    assert health(exod.socket) == health_pb2.HealthCheckResponse.SERVING
    assert exod.status()["pid"] == exod.pid


def test_second_exod_on_the_same_socket_exits_75(exod: Daemon, tmp_path: Path) -> None:
    before = fingerprint(exod.socket)
    env = {**exod.base_env(), "EXOD_HOME": str(tmp_path / "other-home")}
    second = run_exod(env)
    assert second.returncode == 75, second
    assert str(exod.socket) in second.stderr
    assert fingerprint(exod.socket) == before
    assert exod.status()["pid"] == exod.pid
