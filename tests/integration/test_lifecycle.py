"""Ending runners: `exoctl kill`, Ctrl-C on a run, and the idle TTL."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from tests.daemon import (
    ALIVE_STATES,
    Daemon,
    Event,
    group_alive,
    read_some,
    stderr_of,
    timestamp,
    wait_until,
)
from tests.reference import expected

PROMPT = "Once upon a time"


def ready_runner(d: Daemon, model: Path) -> dict[str, Any]:
    """Run once so that the model's runner is loaded; its status entry."""
    result = d.exoctl("run", str(model), PROMPT, "--max-tokens", "4")
    assert result.code == 0, result
    (runner,) = [r for r in d.status()["runners"] if r["state"] in ALIVE_STATES]
    assert isinstance(runner, dict)
    assert runner["state"] == "ready"
    assert group_alive(runner["pid"]), "the runner is not running"
    return runner


def runner_state(d: Daemon, runner_id: str) -> str:
    (runner,) = [r for r in d.status()["runners"] if r["id"] == runner_id]
    return str(runner["state"])


def ts(event: Event) -> float:
    return timestamp(event["ts"])


def of_kind(events: list[Event], kind: str, **fields: Any) -> list[Event]:
    return [e for e in events if e["kind"] == kind and all(e[k] == v for k, v in fields.items())]


def test_kill_ends_the_runners_whole_process_group(exod: Daemon, qwen2: Path) -> None:
    runner = ready_runner(exod, qwen2)
    result = exod.exoctl("kill", runner["id"])
    # When kill returns, nothing of the runner's group is left.
    assert group_alive(runner["pid"]) == []
    assert result.code == 0, result
    assert result.stdout == runner["id"].encode() + b"\n"
    (stopped,) = of_kind(exod.events(), "RunnerStopped", runner_id=runner["id"])
    assert stopped["reason"] == "killed"
    (shown,) = [r for r in exod.status()["runners"] if r["id"] == runner["id"]]
    assert shown["state"] == "stopped"
    # The model is loaded again on demand.
    again = exod.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "12")
    assert again.code == 0, again
    assert again.stdout == expected(qwen2, PROMPT, 12, chat=True).stdout
    assert len(of_kind(exod.events(), "RunnerSpawned")) == 2


def test_kill_during_a_run_fails_the_run_with_75(exod: Daemon, qwen2: Path) -> None:
    runner = ready_runner(exod, qwen2)
    client = exod.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", "20000", "--json")
    head = read_some(client)  # the first token: the run is generating
    result = exod.exoctl("kill", "--all", "--json")
    assert group_alive(runner["pid"]) == []
    assert result.code == 0, result
    assert result.json_lines() == [{"killed": [runner["id"]]}]
    out, err = client.communicate(timeout=30)
    assert client.returncode == 75, err
    assert "killed" in err.decode()
    *tokens, last = (head + out).decode().splitlines()
    assert all(json.loads(t)["type"] == "token" for t in tokens)
    error = json.loads(last)
    assert error["type"] == "error"
    assert error["reason"] == "killed"
    assert error["exit_code"] == 75
    accepted = of_kind(exod.events(), "RunAccepted")[-1]
    (finished,) = of_kind(exod.events(), "RunFinished", run_id=accepted["run_id"])
    assert finished["reason"] == "killed"


def test_kill_all_with_nothing_running_succeeds(exod: Daemon) -> None:
    result = exod.exoctl("kill", "--all")
    assert result.code == 0, result
    assert result.stdout == b""
    result = exod.exoctl("kill", "--all", "--json")
    assert result.code == 0, result
    assert result.json_lines() == [{"killed": []}]


def test_kill_unknown_runner_is_not_found(exod: Daemon, qwen2: Path) -> None:
    result = exod.exoctl("kill", "r-00000000")
    assert result.code == 66, result
    assert "r-00000000" in result.stderr
    # A runner that was killed already is not found either.
    runner = ready_runner(exod, qwen2)
    assert exod.exoctl("kill", runner["id"]).code == 0
    result = exod.exoctl("kill", runner["id"])
    assert result.code == 66, result


def test_ctrl_c_cancels_the_generation_and_the_runner_goes_on(exod: Daemon, qwen2: Path) -> None:
    runner = ready_runner(exod, qwen2)
    since = exod.last_seq()
    client = exod.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", "20000")
    read_some(client)
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=30) == 130
    assert "Traceback" not in stderr_of(client)
    (accepted,) = of_kind(exod.events(since), "RunAccepted")
    finished = exod.wait_event(
        lambda e: e["kind"] == "RunFinished" and e["run_id"] == accepted["run_id"], since=since
    )
    assert finished["stop_reason"] == "cancelled"
    # The log says what the run made before it was cancelled (the client read tokens of it).
    assert finished["generation_tokens"] >= 1
    assert finished["prompt_tokens"] > 0
    # The runner stopped generating (the 2000 tokens would keep it busy for seconds).
    assert wait_until(lambda: runner_state(exod, runner["id"]) == "ready", timeout=2.0)
    # The same runner serves the next run, from the start of its output.
    result = exod.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "20")
    assert result.code == 0, result
    assert result.stdout == expected(qwen2, PROMPT, 20, chat=True).stdout
    events = exod.events()
    assert len(of_kind(events, "RunnerSpawned")) == 1
    assert of_kind(events, "RunAccepted")[-1]["runner_id"] == runner["id"]


def test_idle_runner_is_stopped_after_the_ttl(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = Daemon.create(tmp_path / "home", EXOD_IDLE_TTL="1")
    daemon_factory.append(d)
    d.start()
    result = d.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "4")
    assert result.code == 0, result
    (spawned,) = of_kind(d.events(), "RunnerSpawned")
    stopped = d.wait_event(lambda e: e["kind"] in {"RunnerStopped", "RunnerFailed"}, timeout=10)
    assert stopped["kind"] == "RunnerStopped"
    assert stopped["runner_id"] == spawned["runner_id"]
    assert stopped["reason"] == "idle"
    (finished,) = of_kind(d.events(), "RunFinished")
    idle_for = ts(stopped) - ts(finished)
    assert 0.9 <= idle_for <= 3.5, idle_for
    # The stop is logged once the runner's group is gone.
    assert group_alive(spawned["pid"]) == []
    assert not [r for r in d.status()["runners"] if r["state"] in ALIVE_STATES]
