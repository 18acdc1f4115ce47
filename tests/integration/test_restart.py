"""Restart safety: a new exod on the same home shows every event the old one wrote, once and in
order, closes what died with the old one, and shows no ghost runner."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.daemon import (
    ALIVE_STATES,
    Daemon,
    Event,
    LineReader,
    group_alive,
    read_some,
    stderr_of,
    wait_until,
)

PROMPT = "Once upon a time"


def assert_log_kept(old: list[Event], new: list[Event]) -> None:
    """`new` extends `old`: nothing lost, reordered or duplicated."""
    assert new[: len(old)] == old
    seqs = [e["seq"] for e in new]
    assert seqs == sorted(set(seqs)), "seqs not strictly increasing"
    ids = Counter((e["origin"], e["origin_seq"]) for e in new)
    assert not [k for k, n in ids.items() if n > 1], "(origin, origin_seq) repeated"


def assert_no_ghosts(d: Daemon) -> None:
    """No runner is shown alive whose process is gone."""
    for runner in d.status()["runners"]:
        if runner["state"] in ALIVE_STATES:
            assert group_alive(runner["pid"]), f"ghost runner {runner}"


def of_kind(events: list[Event], kind: str, **fields: object) -> list[Event]:
    return [e for e in events if e["kind"] == kind and all(e[k] == v for k, v in fields.items())]


def test_sigterm_closes_everything_and_restart_keeps_the_log(exod: Daemon, qwen2: Path) -> None:
    done = exod.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "4")
    assert done.code == 0, done
    client = exod.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", "20000")
    read_some(client)
    (runner,) = exod.status()["runners"]
    run_id = of_kind(exod.events(), "RunAccepted")[-1]["run_id"]
    old = exod.events()
    follower = exod.exoctl_bg("events", "--follow")
    assert LineReader(follower).next()  # following

    assert exod.stop(signal.SIGTERM) == 0
    assert group_alive(runner["pid"]) == []  # exod ends its runners before it exits
    assert client.wait(timeout=30) == 69, stderr_of(client)
    assert follower.wait(timeout=30) == 69, stderr_of(follower)
    assert not exod.socket.exists()

    exod.start()
    new = exod.events()
    assert_log_kept(old, new)
    (stopped,) = of_kind(new, "RunnerStopped", runner_id=runner["id"])
    assert stopped["reason"] == "daemon_stopped"
    assert of_kind(new, "RunnerFailed") == []  # nothing was left for the restart to close
    (finished,) = of_kind(new, "RunFinished", run_id=run_id)
    assert finished["reason"] == "daemon_stopped"
    assert [e["kind"] for e in new[len(old) :]][-2:] == ["NodeStopped", "NodeStarted"]
    assert_no_ghosts(exod)
    (shown,) = exod.status()["runners"]
    assert shown["state"] == "stopped"


@pytest.mark.parametrize("snapshot_every", ["500", "2"])
def test_sigkill_mid_run_is_closed_as_interrupted_at_restart(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path, snapshot_every: str
) -> None:
    d = Daemon.create(tmp_path / "home", EXOD_SNAPSHOT_EVERY=snapshot_every)
    daemon_factory.append(d)
    d.start()
    client = d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", "20000")
    read_some(client)  # the first token: the run is generating
    (runner,) = d.status()["runners"]
    assert runner["state"] == "running"
    pids = d.runner_pids()
    # The group leader (the shim, whose pid status shows) and the runner under it.
    assert runner["pid"] in pids and len(pids) == 2
    assert all(os.getpgid(pid) == runner["pid"] for pid in pids)
    old = d.events()
    (accepted,) = of_kind(old, "RunAccepted")

    d.stop(signal.SIGKILL)
    killed = time.monotonic()
    # The lifeline: the runner's group dies with exod, without anyone to kill it.
    assert wait_until(lambda: not group_alive(runner["pid"]), timeout=2.0), group_alive(
        runner["pid"]
    )
    assert time.monotonic() - killed < 2.0
    assert client.wait(timeout=30) == 69, stderr_of(client)

    d.start()
    new = d.events()
    assert_log_kept(old, new)
    (failed,) = of_kind(new, "RunnerFailed", runner_id=runner["id"])
    assert failed["reason"] == "interrupted"
    (finished,) = of_kind(new, "RunFinished", run_id=accepted["run_id"])
    assert finished["reason"] == "interrupted"
    assert finished["stop_reason"] == "interrupted"
    assert_no_ghosts(d)
    (shown,) = d.status()["runners"]
    assert shown["state"] == "failed"
    assert shown["last_error"]["reason"] == "interrupted"

    # A third start closes nothing twice.
    assert d.stop(signal.SIGTERM) == 0
    d.start()
    newer = d.events()
    assert_log_kept(new, newer)
    assert [e["kind"] for e in newer[len(new) :]] == ["NodeStopped", "NodeStarted"]
    assert_no_ghosts(d)


def test_sigkill_with_an_idle_runner_ends_it_and_closes_only_it(exod: Daemon, qwen2: Path) -> None:
    """An idle runner writes nothing to exod, so only its lifeline can tell it that exod died."""
    done = exod.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "4")
    assert done.code == 0, done
    (runner,) = exod.status()["runners"]
    assert runner["state"] == "ready"
    old = exod.events()

    exod.stop(signal.SIGKILL)
    assert wait_until(lambda: not group_alive(runner["pid"]), timeout=2.0), group_alive(
        runner["pid"]
    )

    exod.start()
    new = exod.events()
    assert_log_kept(old, new)
    added = new[len(old) :]
    assert [e["kind"] for e in added] == ["RunnerFailed", "NodeStarted"]
    assert added[0]["runner_id"] == runner["id"]
    assert added[0]["reason"] == "interrupted"
    assert_no_ghosts(exod)


def test_a_sigterm_as_the_socket_appears_stops_exod_cleanly(tmp_path: Path) -> None:
    """A service manager may stop exod while it starts: its socket already answers while the
    rest still starts. It must stop as from SIGTERM at any other time: exit 0, socket removed,
    NodeStopped in the log. (It was ended by the signal's default action, 20 times in 20.)"""
    d = Daemon.create(tmp_path / "home")
    try:
        for _ in range(3):
            d.start(wait=False)
            assert wait_until(d.socket.exists, 30.0, poll=0.001)
            assert d.stop(signal.SIGTERM) == 0, d.log()
            assert not d.socket.exists()
        d.start()
        assert len(of_kind(d.events(), "NodeStopped")) == 3, d.log()
    finally:
        d.cleanup()
