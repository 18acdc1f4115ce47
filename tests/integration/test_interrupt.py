"""Ctrl-C on exoctl, as impatient people press it: twice, a few milliseconds apart, in every
phase of a run. Each time exoctl ends within 2 s with 130 and one line, the run is cancelled in
exod, and exod goes on serving.

Before exoctl handled SIGINT itself (exoctl/interrupt.py), two signals close together hung it in
grpc's channel `__del__` or printed a KeyboardInterrupt traceback about one time in five.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon, read_some, stderr_of, wait_until
from tests.faults import LONG, PROMPT, WRAPPER, arm_wrapper, of_kind
from tests.reference import expected

# The contract: exoctl is gone this soon after the first Ctrl-C.
WITHIN_S = 2.0
CANCELLED_LINE = "exoctl: interrupted; the generation was cancelled.\n"


def double_ctrl_c(client: subprocess.Popen[bytes], gap_ms: int) -> tuple[int, float, str]:
    """Two SIGINTs `gap_ms` apart; exoctl's exit code, seconds to exit, and its stderr."""
    client.send_signal(signal.SIGINT)
    sent = time.monotonic()
    time.sleep(gap_ms / 1000)
    if client.poll() is None:
        client.send_signal(signal.SIGINT)
    try:
        code = client.wait(timeout=10)
    except subprocess.TimeoutExpired:
        client.kill()
        client.wait()
        pytest.fail(f"exoctl still ran 10 s after Ctrl-C: {stderr_of(client)!r}")
    return code, time.monotonic() - sent, stderr_of(client)


def maps_of(pid: int) -> str:
    """The files a process has mapped (its loaded native libraries among them)."""
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it has ended
        return ""


def assert_interrupted(code: int, took: float, stderr: str, line: str = CANCELLED_LINE) -> None:
    assert code == 130, stderr
    assert took <= WITHIN_S, f"exoctl took {took:.2f}s to end after Ctrl-C"
    assert stderr == line, stderr  # one line, no traceback, no second message


def assert_cancelled(d: Daemon, since: int) -> None:
    """The run that exoctl started after `since` is logged as cancelled."""

    def finished() -> list[dict[str, object]]:
        return of_kind(d.events(since), "RunFinished")

    assert wait_until(lambda: len(finished()) == 1, timeout=5.0), d.events(since)
    (accepted,) = of_kind(d.events(since), "RunAccepted")
    (done,) = finished()
    assert done["run_id"] == accepted["run_id"]
    assert done["stop_reason"] == "cancelled", done


def assert_serves(d: Daemon, model: Path) -> None:
    result = d.exoctl("run", str(model), PROMPT, "--max-tokens", "8")
    assert result.code == 0, result
    assert result.stdout == expected(model, PROMPT, 8, chat=True).stdout


def test_two_ctrl_c_mid_stream_again_and_again(exod: Daemon, qwen2: Path) -> None:
    assert_serves(exod, qwen2)  # the runner is loaded: every try below is mid-stream
    for attempt in range(20):
        since = exod.last_seq()
        client = exod.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG)
        read_some(client)
        code, took, stderr = double_ctrl_c(client, gap_ms=attempt % 4)  # 0-3 ms apart
        assert_interrupted(code, took, stderr)
        assert_cancelled(exod, since)
    assert_serves(exod, qwen2)


def test_two_ctrl_c_while_importing(exod: Daemon, qwen2: Path) -> None:
    since = exod.last_seq()
    client = exod.exoctl_bg("run", str(qwen2), PROMPT)
    # While gRPC's native library is being loaded: exoctl's handler is in place (it is installed
    # before any slow import) and the rest of its imports take a hundred milliseconds or more,
    # so it has not connected yet. (A signal before the interpreter has run exoctl's first line
    # meets Python's own handler, which no program can replace.)
    assert wait_until(lambda: "cygrpc" in maps_of(client.pid), timeout=30, poll=0.001)
    code, took, stderr = double_ctrl_c(client, gap_ms=1)
    assert_interrupted(code, took, stderr, line="exoctl: interrupted.\n")
    assert of_kind(exod.events(since), "RunAccepted") == []
    assert_serves(exod, qwen2)


def test_two_ctrl_c_while_queued(daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path) -> None:
    # One generation at a time, so that a second run waits in the queue.
    exod = Daemon.create(tmp_path / "home", EXOD_PARALLEL="1")
    daemon_factory.append(exod)
    exod.start()
    assert_serves(exod, qwen2)
    busy = exod.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG)
    read_some(busy)  # the runner is generating for it; the next run waits in the queue
    since = exod.last_seq()
    client = exod.exoctl_bg("run", str(qwen2), PROMPT)
    assert wait_until(lambda: queued(exod) == 1, timeout=15.0)
    code, took, stderr = double_ctrl_c(client, gap_ms=2)
    assert_interrupted(code, took, stderr)
    assert wait_until(lambda: queued(exod) == 0, timeout=5.0)
    busy.send_signal(signal.SIGINT)
    assert busy.wait(timeout=10) == 130
    accepted = of_kind(exod.events(since), "RunAccepted")
    exod.wait_event(
        lambda e: e["kind"] == "RunFinished" and e["run_id"] == accepted[0]["run_id"], since=since
    )
    finished = of_kind(exod.events(since), "RunFinished", run_id=accepted[0]["run_id"])
    assert [e["stop_reason"] for e in finished] == ["cancelled"]
    assert_serves(exod, qwen2)


def test_two_ctrl_c_while_loading(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = Daemon.create(tmp_path / "home", EXOD_RUNNER_WRAPPER=str(WRAPPER))
    daemon_factory.append(d)
    d.start()
    arm_wrapper(d, "hang")  # the runner never starts: its load is in progress for good
    since = d.last_seq()
    client = d.exoctl_bg("run", str(qwen2), PROMPT)
    assert wait_until(lambda: bool(of_kind(d.events(since), "RunAccepted")), timeout=15.0)
    assert [r["state"] for r in d.status()["runners"]] in (["spawning"], ["loading"])
    code, took, stderr = double_ctrl_c(client, gap_ms=0)
    assert_interrupted(code, took, stderr)
    assert_cancelled(d, since)
    d.ok("kill", "--all")
    assert_serves(d, qwen2)


def test_events_follow_ends_on_two_ctrl_c(exod: Daemon) -> None:
    follower = exod.exoctl_bg("events", "--follow")
    read_some(follower)  # NodeStarted: it is following
    code, took, stderr = double_ctrl_c(follower, gap_ms=1)
    assert (code, stderr) == (0, "")  # Ctrl-C is how --follow ends: success, nothing to say
    assert took <= WITHIN_S
    assert exod.exoctl("status").code == 0


def queued(d: Daemon) -> int:
    return sum(int(r["queued"]) for r in d.status()["runners"])
