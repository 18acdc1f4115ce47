"""`exoctl status --json` and `exoctl events --json [--follow]`: the shapes scripts rely on."""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

from exod import __version__
from tests.daemon import Daemon, LineReader, stderr_of

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def test_status_json_describes_the_daemon_and_its_runners(shared_exod: Daemon, qwen2: Path) -> None:
    result = shared_exod.exoctl("run", str(qwen2), "Hello", "--max-tokens", "4")
    assert result.code == 0, result
    status = shared_exod.status()
    assert status["version"] == __version__
    assert status["pid"] == shared_exod.pid
    assert status["home"] == str(shared_exod.home)
    assert status["node_id"]
    (runner,) = [r for r in status["runners"] if r["model_path"] == str(qwen2)]
    assert runner["id"].startswith("r-")
    assert runner["model"] == str(qwen2)
    assert runner["state"] == "ready"
    assert runner["pid"] in shared_exod.runner_pids()
    assert runner["memory_bytes"] > 0
    assert runner["last_error"] is None
    # The table shows the same runner.
    table = shared_exod.ok("status").text
    assert runner["id"] in table
    assert str(runner["pid"]) in table


def test_events_json_lines_carry_the_envelope_and_the_payload(
    shared_exod: Daemon, qwen2: Path
) -> None:
    result = shared_exod.exoctl("run", str(qwen2), "Hello", "--max-tokens", "4")
    assert result.code == 0, result
    events = shared_exod.events()
    node_id = shared_exod.status()["node_id"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for e in events:
        assert isinstance(e["seq"], int)
        assert e["origin"] == node_id
        assert isinstance(e["origin_seq"], int)
        assert RFC3339_UTC.fullmatch(e["ts"]), e["ts"]
        # UTC, in seconds: within the last few minutes.
        age = time.time() - datetime.fromisoformat(e["ts"]).astimezone(UTC).timestamp()
        assert -5 < age < 600, e
    (started,) = [e for e in events if e["kind"] == "NodeStarted"]
    assert started["version"] == __version__
    assert started["pid"] == shared_exod.pid
    spawned = next(e for e in events if e["kind"] == "RunnerSpawned")
    assert spawned["runner_id"].startswith("r-")
    assert spawned["model_path"] == str(qwen2)
    assert spawned["pid"] > 0
    finished = [e for e in events if e["kind"] == "RunFinished"][-1]
    assert finished["stop_reason"] == "length"
    assert finished["generation_tokens"] == 4
    # --since and --limit select a slice of the same lines.
    tail = shared_exod.ok("events", "--json", "--since", "2", "--limit", "2").json_lines()
    assert tail == events[2:4]


def test_events_follow_prints_an_event_written_after_it_started(
    shared_exod: Daemon, llama: Path
) -> None:
    last = shared_exod.last_seq()
    follower = shared_exod.exoctl_bg("events", "--follow", "--json")
    lines = LineReader(follower)
    # Everything already in the log first: then it is following.
    seen = 0
    while seen < last:
        seen = int(json.loads(lines.next())["seq"])
    assert shared_exod.exoctl("models", "add", "follow-me", str(llama)).code == 0
    line = json.loads(lines.next())
    assert line["kind"] == "ModelAdded"
    assert line["name"] == "follow-me"
    assert line["seq"] == last + 1
    follower.send_signal(signal.SIGINT)  # Ctrl-C is how --follow ends
    assert follower.wait(timeout=30) == 0, stderr_of(follower)
