"""Replication: time from `exoctl cluster join` to both nodes listing each other alive, and
events per second from A's log into B's fold.

Two real exods on loopback (A on 127.0.0.2, B on 127.0.0.3, ports the kernel picks). A makes a
cluster, B joins: the first figure is from starting `exoctl cluster join` on B until B's
`exoctl status` lists A alive and A's lists B. Then A is stopped, N replicated events (runners
spawned and stopped, as A would write them) are appended to A's log as A's own, and A is started
again: B follows A from the last origin_seq it holds and copies them. The second figure is the
rate at which B's log grows with them, from the first to arrive to the last (so B's reconnect
backoff is not counted), each one received over mutual TLS, checked, written to SQLite and
folded.

Run: `.venv/bin/python bench/bench_replication.py [--events N]`. Nothing is asserted; record the
figures in docs/benchmarks.md. Every process started here is ended by its pid, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from exod.eventlog import EventStore
from exod.proto.exo.v1 import events_pb2


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Node:
    def __init__(self, work: Path, name: str, address: str) -> None:
        self.home = work / name
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EXOD_")},
            "EXOD_HOME": str(self.home),
            "EXOD_SOCKET": str(work / f"{name}.sock"),
            "EXOD_HTTP_PORT": "0",
            "EXOD_PEER_BIND": address,
            "EXOD_PEER_PORT": str(free_port(address)),
            "EXOD_JOIN_PORT": str(free_port(address)),
            "EXOD_PEER_TIMEOUT": "2",
            "EXOD_LOG_LEVEL": "warning",
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

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.exoctl("status", "--json"))
        return result

    def lists_alive(self, node_id: str) -> bool:
        return any(n["id"] == node_id and n["state"] == "alive" for n in self.status()["nodes"])


def append_as(home: Path, count: int) -> None:
    """Append `count` replicated events to a stopped exod's log, as its own."""
    node_id = (home / "node_id").read_text().strip()
    with EventStore(home / "exod.db", node_id) as store:
        for i in range(count // 2):
            rid = f"r-bench{i}"
            spawned = events_pb2.RunnerSpawned(runner_id=rid, model="bench", pid=1)
            store.append(events_pb2.Event(runner_spawned=spawned))
            stopped = events_pb2.RunnerStopped(runner_id=rid, reason="killed")
            store.append(events_pb2.Event(runner_stopped=stopped))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events to replicate")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="exo-bench-repl-"))
    a, b = Node(work, "a", "127.0.0.2"), Node(work, "b", "127.0.0.3")
    try:
        a.start()
        b.start()
        a.exoctl("cluster", "init")
        a_id, b_id = a.status()["node_id"], b.status()["node_id"]
        token = a.exoctl("cluster", "invite").strip()
        started = time.perf_counter()
        b.exoctl("cluster", "join", token)
        while not (b.lists_alive(a_id) and a.lists_alive(b_id)):
            time.sleep(0.02)
        listed = time.perf_counter() - started
        print(f"join to listed (both ways, alive): {listed * 1000:.0f} ms")

        a.stop()
        append_as(a.home, args.events)
        base = b.status()["event_count"]
        a.start()
        first = last = None
        count = base
        # A's NodeStopped and NodeStarted come with them.
        want = base + args.events + 2
        deadline = time.monotonic() + 600
        while count < want and time.monotonic() < deadline:
            count = b.status()["event_count"]
            now = time.perf_counter()
            if first is None and count > base + 2:
                first = (now, count)
            last = (now, count)
            time.sleep(0.05)
        if first is None or last is None or last[1] <= first[1]:
            print("B copied too few events to measure a rate")
            return
        rate = (last[1] - first[1]) / (last[0] - first[0])
        print(f"replicated {count - base} events; {rate:,.0f} events/s from A's log into B's fold")
    finally:
        b.stop()
        a.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
