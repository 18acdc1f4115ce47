"""Limits enforced from outside, on real runners: stalls ended within their timeout + 2 s, the
whole process group gone (the wrapper's own child included), however the runner is ended and
even when exod itself is killed; a full disk fails new runs with 75 and nothing else.

Every deadline is measured from the moment the fault is injected to the moment no process of the
runner's group is left, as `ps` would see it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import models
from tests.daemon import Daemon, group_alive, pids_alive, read_some, short_dir, wait_until
from tests.faults import (
    LONG,
    PROMPT,
    WRAPPER,
    Group,
    big_model,
    client_outcome,
    next_group,
    of_kind,
    ready_group,
    runner_status,
    shims,
    wait_state,
    wrapper_children,
)
from tests.reference import expected

# Small timeouts for a quick test; still long enough that a good model's load (about 1.5 s of
# imports on this machine, more when it is busy) is never mistaken for a stall.
LOAD_STALL = 3.0
DECODE_STALL = 2.0
# The contract: a stall is ended within its timeout plus this.
MARGIN = 2.0
LIMITS = {
    "EXOD_LOAD_STALL_TIMEOUT": str(LOAD_STALL),
    "EXOD_DECODE_STALL_TIMEOUT": str(DECODE_STALL),
    "EXOD_KILL_GRACE": "1",
}


def started(made: list[Daemon], home: Path, **env: str) -> Daemon:
    d = Daemon.create(home, **{**LIMITS, **env})
    made.append(d)
    return d.start()


def test_a_load_stopped_with_sigstop_is_ended_within_the_stall_timeout(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = started(daemon_factory, tmp_path / "home")
    client = d.exoctl_bg("run", str(big_model()), PROMPT, "--json")
    group = next_group(d)
    wait_state(d, group.runner_id, lambda r: r["state"] == "loading")
    stopped = time.monotonic()
    group.kill(signal.SIGSTOP)
    assert runner_status(d, group.runner_id)["state"] == "loading"  # stopped mid-load

    took = group.wait_gone(stopped, timeout=LOAD_STALL + 15)
    assert took <= LOAD_STALL + MARGIN, f"the stalled load was ended {took:.2f}s after SIGSTOP"
    code, lines = client_outcome(client)
    assert code == 75, lines
    assert lines[-1]["type"] == "error"
    assert lines[-1]["reason"] == "load_stall"
    shown = runner_status(d, group.runner_id)
    assert shown["state"] == "failed"
    assert shown["last_error"]["reason"] == "load_stall"
    events = d.events()
    (failed,) = of_kind(events, "RunnerFailed", runner_id=group.runner_id)
    assert failed["reason"] == "load_stall"
    assert "EXOD_LOAD_STALL_TIMEOUT" in failed["detail"]
    assert of_kind(events, "RunnerReady", runner_id=group.runner_id) == []
    (finished,) = of_kind(events, "RunFinished")
    assert finished["reason"] == "load_stall"

    # The next run, on a good model, works.
    result = d.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "8")
    assert result.code == 0, result
    assert result.stdout == expected(qwen2, PROMPT, 8, chat=True).stdout


@pytest.mark.parametrize("force", [False, True])
def test_weights_that_never_arrive_do_not_hang_anything(exod: Daemon, force: bool) -> None:
    """model.safetensors is a named pipe nobody writes: opening it for reading blocks forever."""
    fifo = models.weights_fifo()
    started_at = time.monotonic()
    result = exod.exoctl("run", str(fifo), PROMPT, *(["--force"] if force else []), timeout=60)
    assert time.monotonic() - started_at < 30
    assert result.code in (65, 75), result
    assert "model.safetensors" in result.stderr
    assert of_kind(exod.events(), "RunnerSpawned") == []  # refused up front
    assert shims(exod) == {}
    assert exod.runner_pids() == []
    assert exod.status()["pid"] == exod.pid  # still serving


def test_a_generation_stopped_with_sigstop_is_ended_within_the_decode_stall_timeout(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = started(daemon_factory, tmp_path / "home")
    group = ready_group(d, qwen2)
    client = d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG, "--json")
    head = read_some(client)  # a token: the runner is decoding
    stopped = time.monotonic()
    group.kill(signal.SIGSTOP)

    took = group.wait_gone(stopped, timeout=DECODE_STALL + 15)
    assert took <= DECODE_STALL + MARGIN, f"the stalled decode was ended {took:.2f}s after SIGSTOP"
    code, lines = client_outcome(client, head)
    assert code == 75, lines
    assert lines[0]["type"] == "token"
    assert lines[-1]["reason"] == "decode_stall"
    events = d.events()
    (failed,) = of_kind(events, "RunnerFailed", runner_id=group.runner_id)
    assert failed["reason"] == "decode_stall"
    assert "EXOD_DECODE_STALL_TIMEOUT" in failed["detail"]
    assert of_kind(events, "RunFinished")[-1]["reason"] == "decode_stall"
    assert runner_status(d, group.runner_id)["last_error"]["reason"] == "decode_stall"


def end_by(how: str, d: Daemon, group: Group) -> float:
    """End a decoding runner: `exoctl kill`, a decode stall, or SIGKILL to exod. Returns the
    moment of the fault."""
    at = time.monotonic()
    if how == "kill":
        result = d.exoctl("kill", group.runner_id)
        assert result.code == 0, result
    elif how == "stall":
        group.kill(signal.SIGSTOP)
    else:
        d.stop(signal.SIGKILL)
    return at


@pytest.mark.parametrize(
    ("how", "deadline", "reason"),
    [
        ("kill", 0.0, "killed"),  # exoctl kill returns only once the group is gone
        ("stall", DECODE_STALL + MARGIN, "decode_stall"),
        ("exod_sigkill", 2.0, ""),  # the lifeline, with nobody left to kill anything
    ],
    ids=["kill", "stall", "exod_sigkill"],
)
def test_the_wrapper_child_shim_and_runner_all_go(
    daemon_factory: list[Daemon],
    tmp_path: Path,
    qwen2: Path,
    how: str,
    deadline: float,
    reason: str,
) -> None:
    d = started(daemon_factory, tmp_path / "home", EXOD_RUNNER_WRAPPER=str(WRAPPER))
    group = ready_group(d, qwen2)
    client = d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG, "--json")
    head = read_some(client)
    runner = group.runner_pid()
    (child,) = wrapper_children(d)
    assert runner is not None
    assert sorted(group.members()) == sorted([group.pgid, runner, child])
    assert os.getpgid(child) == group.pgid

    at = end_by(how, d, group)
    took = group.wait_gone(at, timeout=deadline + 15)
    assert pids_alive([group.pgid, runner, child]) == []
    if how == "kill":
        assert group.members() == []  # gone by the time kill returned, not a moment later
    else:
        assert took <= deadline, f"the group outlived the fault by {took:.2f}s"
    code, lines = client_outcome(client, head)
    if how == "exod_sigkill":
        assert code == 69, lines  # the daemon went away mid-run
        return
    assert code == 75, lines
    assert lines[-1]["reason"] == reason
    ended = of_kind(d.events(), "RunnerStopped" if how == "kill" else "RunnerFailed")
    assert [e["reason"] for e in ended] == [reason]


def test_sigkill_of_exod_mid_generation_leaves_neither_shim_nor_runner(
    exod: Daemon, qwen2: Path
) -> None:
    group = ready_group(exod, qwen2)
    client = exod.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG)
    read_some(client)
    runner = group.runner_pid()
    assert runner is not None
    assert runner_status(exod, group.runner_id)["state"] == "running"
    killed = time.monotonic()
    exod.stop(signal.SIGKILL)
    assert wait_until(lambda: not pids_alive([group.pgid, runner]), timeout=2.0), pids_alive(
        [group.pgid, runner]
    )
    assert time.monotonic() - killed <= 2.0
    assert group_alive(group.pgid) == []
    assert client.wait(timeout=30) == 69


def test_a_stopped_group_that_outlives_exod_is_ended_when_exod_starts_again(
    exod: Daemon, qwen2: Path
) -> None:
    """The one case the lifeline cannot cover: every process of the group is stopped, so none
    can act on exod's death (the kernel holds the shim's death signal until SIGCONT). The next
    exod finds the group by pid and start time in its log and ends it before it serves."""
    group = ready_group(exod, qwen2)
    group.kill(signal.SIGSTOP)
    exod.stop(signal.SIGKILL)
    time.sleep(1.0)
    assert group.members(), "the premise: a stopped group cannot end itself"
    exod.start()
    assert group.members() == []
    (failed,) = of_kind(exod.events(), "RunnerFailed", runner_id=group.runner_id)
    assert failed["reason"] == "interrupted"


# --- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 48 MiB tmpfs of our own, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = short_dir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)
    shutil.rmtree(mount, ignore_errors=True)


def fill(path: Path) -> None:
    """Write `path` until the disk is full."""
    chunk = b"\0" * (1 << 20)
    with path.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(chunk)
            f.flush()
    assert shutil.disk_usage(path.parent).free < (1 << 20)


def test_a_full_disk_fails_new_runs_with_75_and_exod_keeps_serving(
    daemon_factory: list[Daemon], small_disk: Path, qwen2: Path, llama: Path
) -> None:
    d = Daemon.create(small_disk / "home")
    daemon_factory.append(d)
    d.start()
    group = ready_group(d, qwen2)
    before = d.events()
    fill(small_disk / "filler")

    # A run on the loaded runner: its RunAccepted cannot be written.
    result = d.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "4")
    assert result.code == 75, result
    assert "disk is full" in result.stderr
    # A run that needs a new runner: its RunnerSpawned cannot be written, so no runner is left.
    result = d.exoctl("run", str(llama), PROMPT, "--max-tokens", "4")
    assert result.code == 75, result
    assert "disk is full" in result.stderr
    assert set(shims(d)) == {group.runner_id}

    # Status and kill still work; the kill ends the group though its event cannot be written.
    status = d.status()
    assert status["pid"] == d.pid
    assert [r["id"] for r in status["runners"]] == [group.runner_id]
    killed = d.exoctl("kill", group.runner_id, timeout=30)
    assert killed.code == 0, killed
    assert group_alive(group.pgid) == []
    assert d.events() == before  # nothing could be added
    assert d.exoctl("kill", group.runner_id).code == 66  # and it is gone for exod too

    # Space again: exod serves runs, and a restart closes what the full disk kept out of the log.
    (small_disk / "filler").unlink()
    result = d.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "4")
    assert result.code == 0, result
    assert d.stop(signal.SIGTERM) == 0
    d.start()
    (closed,) = of_kind(d.events(), "RunnerFailed", runner_id=group.runner_id)
    assert closed["reason"] == "interrupted"
