"""Keeping the machine awake while exod serves: the decision and the command (pure), the hold
(a real child process: started once, ended and reaped on release, never outliving exod), and
KeepAwake (one hold for overlapping runs, released a moment after the last)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from exod import config
from exod.service import awake
from exod.service.awake import Hold, KeepAwake

ROOT = Path(__file__).resolve().parents[2]
LOGGER = "exod.awake"
SLEEP = ["sleep", "1000"]
# What systemd-inhibit says and does where no logind answers (a container), as measured.
NO_LOGIND = ["sh", "-c", "echo 'Failed to connect to bus: No such file or directory' >&2; exit 1"]


def gone(pid: int) -> bool:
    """No process (not even a zombie) has this pid: it ended and was reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


# --- the decision and the command -----------------------------------------------------------


def test_serving_is_any_run_in_flight_or_a_rank_held() -> None:
    assert not awake.wanted(0)
    assert awake.wanted(1)
    assert awake.wanted(3)
    assert awake.wanted(0, ranks_held=1)


def test_macos_holds_with_caffeinate_bound_to_exod() -> None:
    command = awake.hold_command("darwin", 4242, lambda name: None)
    assert command == ["/usr/bin/caffeinate", "-i", "-w", "4242"]


def test_linux_holds_with_systemd_inhibit_when_it_exists() -> None:
    tools = {"systemd-inhibit": "/usr/bin/systemd-inhibit", "cat": "/usr/bin/cat"}
    assert awake.hold_command("linux", 4242, tools.get) == [
        "/usr/bin/systemd-inhibit",
        "--what=idle:sleep",
        "--who=exod",
        "--why=serving a run",
        "--mode=block",
        "/usr/bin/cat",
    ]
    assert awake.hold_command("linux", 4242, {"cat": "/usr/bin/cat"}.get) is None


@pytest.mark.parametrize("platform", ["win32", "freebsd14", "cygwin"])
def test_elsewhere_nothing_holds(platform: str) -> None:
    assert awake.hold_command(platform, 4242, lambda name: "/bin/" + name) is None


def test_keep_awake_is_on_by_default_and_0_turns_it_off() -> None:
    env = {"HOME": "/h"}
    assert config.load({}, env).keep_awake is True
    assert config.load({}, {**env, "EXOD_KEEP_AWAKE": "0"}).keep_awake is False
    assert config.load({"keep_awake": "off"}, env).keep_awake is False
    with pytest.raises(config.ConfigError, match=r"^invalid EXOD_KEEP_AWAKE 'maybe': expected 1"):
        config.load({}, {**env, "EXOD_KEEP_AWAKE": "maybe"})


def test_off_means_no_hold() -> None:
    assert KeepAwake.for_this_machine(enabled=False).hold is None


# --- the hold: a real child process ---------------------------------------------------------


def test_a_hold_starts_one_child_and_release_ends_and_reaps_it() -> None:
    hold = Hold(SLEEP)
    hold.take()
    pid = hold.pid
    assert pid is not None and not gone(pid)
    hold.take()  # taken twice: still the one child
    assert hold.pid == pid
    assert os.getpgid(pid) == pid  # its own group, so that release ends what it started
    hold.release()
    assert not hold.held
    assert gone(pid)  # ended and reaped, not left a zombie
    hold.release()  # nothing left to release: nothing happens


def test_a_hold_ignoring_sigterm_is_killed() -> None:
    stubborn = [sys.executable, "-c", "import signal,time; signal.signal(15, 1); time.sleep(99)"]
    hold = Hold(stubborn)
    hold.take()
    pid = hold.pid
    assert pid is not None
    time.sleep(0.3)  # let it install its handler
    started = time.monotonic()
    hold.release()
    assert gone(pid)
    assert time.monotonic() - started < awake.END_WAIT_S + 2


def test_a_hold_that_ends_by_itself_is_said_once_and_never_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hold = Hold(NO_LOGIND)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        hold.take()
        pid = hold.pid
        assert pid is not None
        assert wait_for(lambda: _exited(pid))
        hold.check()
        hold.take()
        hold.release()
    assert hold.failed and not hold.held
    assert gone(pid)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "cannot keep this machine awake while it serves (sh ended with status 1: Failed to "
        "connect to bus: No such file or directory); it may sleep mid-run. Not trying again "
        "until exod restarts; EXOD_KEEP_AWAKE=0 stops trying at all"
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def _exited(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie until its parent reaps it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_command_that_cannot_start_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    hold = Hold(["/nonexistent/caffeinate", "-i"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        hold.take()
        hold.take()
    assert hold.failed and not hold.held
    assert [r.getMessage() for r in caplog.records] == [
        "cannot keep this machine awake while it serves (/nonexistent/caffeinate could not be "
        "started: No such file or directory); it may sleep mid-run. Not trying again until exod "
        "restarts; EXOD_KEEP_AWAKE=0 stops trying at all"
    ]


SIGKILLED_EXOD = textwrap.dedent(
    """
    import sys, time
    from exod.service.awake import Hold
    hold = Hold(["cat"])
    hold.take()
    print(hold.pid, flush=True)
    time.sleep(1000)
    """
)


def test_the_linux_hold_ends_when_exod_is_killed() -> None:
    """systemd-inhibit's `cat` reads a pipe whose other end only exod holds: an exod ended by
    SIGKILL leaves no hold behind."""
    exod = subprocess.Popen(
        [sys.executable, "-c", SIGKILLED_EXOD], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert exod.stdout is not None
        cat = int(exod.stdout.readline())
        assert not gone(cat)
        exod.send_signal(signal.SIGKILL)
        exod.wait()
        # Orphaned, it is reaped by init (or the nearest subreaper) once it has ended.
        assert wait_for(lambda: gone(cat) or _exited(cat)), "the hold outlived exod"
    finally:
        if exod.poll() is None:
            exod.kill()
            exod.wait()
        if exod.stdout is not None:
            exod.stdout.close()


# --- KeepAwake: what Runs talks to ----------------------------------------------------------


def test_overlapping_runs_hold_once_and_release_after_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        keep = KeepAwake(Hold(SLEEP), release_after=0.3, check_after=0.05)
        assert keep.hold is not None
        keep.run_started("run-1")
        pid = keep.hold.pid
        keep.run_started("run-2")  # queued beside the first: the same hold
        assert keep.hold.pid == pid and pid is not None
        await asyncio.sleep(0.1)  # checked: it holds
        keep.run_ended("run-1")
        await asyncio.sleep(0.5)
        assert keep.hold.pid == pid  # one run still in flight
        keep.run_ended("run-2")
        keep.run_ended("run-2")  # an end said twice changes nothing
        await asyncio.sleep(0.1)
        assert keep.hold.pid == pid  # the release waits a moment
        await asyncio.sleep(0.4)
        assert not keep.hold.held
        assert gone(pid)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("keeping this machine awake while it serves (sleep, pid ")
    assert lines[1] == "no longer keeping this machine awake: nothing to serve"


def test_a_run_during_the_wait_keeps_the_same_hold() -> None:
    async def scenario() -> None:
        keep = KeepAwake(Hold(SLEEP), release_after=0.3)
        assert keep.hold is not None
        keep.run_started("run-1")
        pid = keep.hold.pid
        keep.run_ended("run-1")
        await asyncio.sleep(0.1)
        keep.run_started("run-2")  # no child per run for a client sending one after another
        await asyncio.sleep(0.4)
        assert keep.hold.pid == pid
        keep.close()
        assert pid is not None and gone(pid)

    asyncio.run(scenario())


def test_close_releases_at_once() -> None:
    async def scenario() -> None:
        keep = KeepAwake(Hold(SLEEP), release_after=60)
        assert keep.hold is not None
        keep.run_started("run-1")
        pid = keep.hold.pid
        keep.close()  # exod stopping with a run in flight
        assert pid is not None and gone(pid)
        assert not keep.hold.held

    asyncio.run(scenario())


def test_a_failed_hold_is_not_retried_for_later_runs() -> None:
    async def scenario() -> None:
        keep = KeepAwake(Hold(NO_LOGIND), release_after=0.05, check_after=0.2)
        assert keep.hold is not None
        keep.run_started("run-1")
        await asyncio.sleep(0.4)
        assert keep.hold.failed
        keep.run_ended("run-1")
        keep.run_started("run-2")
        assert not keep.hold.held
        keep.close()

    asyncio.run(scenario())


def test_without_a_hold_runs_change_nothing() -> None:
    keep = KeepAwake(None)
    keep.run_started("run-1")  # no event loop needed: nothing is scheduled
    keep.run_ended("run-1")
    keep.close()
