"""`exoctl status --json` and `exoctl events --json [--follow]`: the shapes scripts rely on."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from exod import __version__
from tests import models
from tests.daemon import Daemon, LineReader, read_some, stderr_of

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


# What moves between two status calls (the prompt cache's figures among them: the runner reports
# those after the run).
MOVING = frozenset(
    {
        "uptime_s",
        "idle_s",
        "last_seen",
        "memory_bytes",
        "memory_free_bytes",
        "prompt_cache_bytes",
        "prompt_cache_hit_rate",
    }
)


def _without(obj: Any, keys: frozenset[str] = MOVING) -> Any:
    """obj with those keys left out at every depth."""
    if isinstance(obj, dict):
        return {k: _without(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_without(v, keys) for v in obj]
    return obj


def test_status_json_describes_the_daemon_and_its_runners(shared_exod: Daemon, qwen2: Path) -> None:
    result = shared_exod.exoctl("run", str(qwen2), "Hello", "--max-tokens", "4")
    assert result.code == 0, result
    status = json.loads(shared_exod.ok("status", "--json").stdout)
    # The tests' in-process status() says the same, less what moves between two calls.
    assert _without(shared_exod.status()) == _without(status)
    assert status["version"] == __version__
    assert status["pid"] == shared_exod.pid
    assert status["home"] == str(shared_exod.home)
    assert re.fullmatch(r"n-[0-9a-f]{12}", status["node_id"])
    assert status["node_name"] == socket.gethostname().split(".")[0]
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
    events = shared_exod.ok("events", "--json").json_lines()
    assert shared_exod.events() == events  # the tests' in-process events() says the same
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


def _table(lines: list[str]) -> list[dict[str, str]]:
    """The rows of an `exoctl status` table by column name, cut where the header's words start."""
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = [*zip(starts, [*starts[1:], None], strict=True)]
    return [
        {name: line[a:b].strip() for name, (a, b) in zip(names, bounds, strict=True)}
        for line in lines[1:]
    ]


def test_status_says_why_each_runner_ended_and_lists_only_live_ones_by_default(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path, llama: Path
) -> None:
    d = Daemon.create(tmp_path / "home", EXOD_IDLE_TTL="1")
    daemon_factory.append(d)
    d.start()
    d.ok("models", "add", "idler", str(qwen2))
    d.ok("models", "add", "busy", str(llama))
    d.ok("models", "add", "broken", str(models.mismatched_shapes()))

    # One runner ends idle.
    assert d.exoctl("run", "idler", "Hello", "--max-tokens", "2").code == 0
    d.wait_event(lambda e: e["kind"] == "RunnerStopped" and e["reason"] == "idle")
    # One runs: the table lists it, and counts the one that ended.
    client = d.exoctl_bg("run", "busy", "Hello", "--max-tokens", "100000")
    read_some(client)
    (live,) = [r for r in d.status()["runners"] if r["state"] == "running"]
    lines = d.ok("status").text.splitlines()
    assert lines[0].startswith(f"exod {__version__} (api ")
    (row,) = _table(lines[1:-1])
    memory = row.pop("MEMORY")
    work = {name: row.pop(name) for name in ("MLX_PID", "ACTIVE", "QUEUED", "CACHE", "HIT")}
    assert row == {"ID": live["id"], "MODEL": "busy", "STATE": "running", "PID": str(live["pid"])}
    assert re.fullmatch(r"\d+\.\d (MiB|GiB)", memory), memory
    assert (work["MLX_PID"], work["ACTIVE"], work["QUEUED"]) == (str(live["mlx_pid"]), "1", "0")
    assert re.fullmatch(r"\d+%", work["HIT"]), work
    assert lines[-1] == "1 ended runner not shown; `exoctl status --all` shows why it ended"
    # It is killed; another fails to load.
    d.ok("kill", live["id"])
    assert client.wait(timeout=30) == 75, stderr_of(client)
    assert d.exoctl("run", "broken", "Hello").code == 65

    assert d.ok("status").text.splitlines()[1:] == [
        "no runners running",
        "3 ended runners not shown; `exoctl status --all` shows why they ended",
    ]
    rows = _table(d.ok("status", "--all").text.splitlines()[1:])
    assert [(r["MODEL"], r["STATE"], r["PID"], r["MEMORY"]) for r in rows] == [
        ("idler", "stopped", "-", "-"),
        ("busy", "stopped", "-", "-"),
        ("broken", "failed", "-", "-"),
    ]
    assert all(re.fullmatch(r"\d+s ago", r["ENDED"]) for r in rows), rows
    assert rows[0]["WHY"] == "idle: unused for EXOD_IDLE_TTL"
    assert rows[1]["WHY"] == "killed: by `exoctl kill`"
    assert rows[2]["WHY"].startswith("weights_corrupt: cannot load ")

    # --json lists every runner, live or not, each with why and when it ended.
    shown = d.status()["runners"]
    assert [(r["model"], r["state"], r["pid"], r["end_reason"]) for r in shown] == [
        ("idler", "stopped", 0, "idle"),
        ("busy", "stopped", 0, "killed"),
        ("broken", "failed", 0, "weights_corrupt"),
    ]
    assert [r["last_error"] is None for r in shown] == [True, True, False]
    assert shown[2]["last_error"]["reason"] == "weights_corrupt"
    for r in shown:
        assert RFC3339_UTC.fullmatch(r["ended_at"]), r
        age = time.time() - datetime.fromisoformat(r["ended_at"]).timestamp()
        assert 0 <= age < 120, r


def test_events_print_times_as_times(shared_exod: Daemon, qwen2: Path) -> None:
    # A runner of this model was spawned by now, by this test or an earlier one.
    assert shared_exod.exoctl("run", str(qwen2), "Hello", "--max-tokens", "2").code == 0
    text = shared_exod.ok("events").text
    assert "e+" not in text
    spawned = next(line for line in text.splitlines() if "  RunnerSpawned  " in line)
    when = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(rf"\d+  {when}  RunnerSpawned  .* start_time={when} .*", spawned), spawned
    # --json keeps the number, written out in full.
    lines = shared_exod.ok("events", "--json").text.splitlines()
    raw = next(line for line in lines if '"kind":"RunnerSpawned"' in line)
    assert re.search(r'"start_time":\d{10}\.\d+,', raw), raw
