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
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ beside exod/
from bench.node import BenchNode  # after the path above
from exod.eventlog import EventStore
from exod.proto.exo.v1 import events_pb2


class Node(BenchNode):
    def __init__(self, work: Path, name: str, address: str) -> None:
        super().__init__(work, name, address, EXOD_PEER_TIMEOUT="2")

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
