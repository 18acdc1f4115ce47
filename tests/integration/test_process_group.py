"""How exod ends a runner's process group, on a real group whose members ignore SIGTERM.

A runner dies of SIGTERM at once, so the daemon-level tests cannot tell whether the supervisor
would go on to SIGKILL; here the group is made of processes that ignore SIGTERM, as a runner
wedged in native code (or a helper it started) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from exod.runners import process
from tests.daemon import group_alive

# A leader and a child, both ignoring SIGTERM (the child inherits the disposition across exec).
STUBBORN = (
    "import signal, subprocess, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen(['sleep', '600'])\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def stubborn_group() -> Iterator[int]:
    """The pgid of a fresh group of two processes that ignore SIGTERM."""
    leader = subprocess.Popen(
        [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, start_new_session=True
    )
    assert leader.stdout is not None
    assert leader.stdout.readline() == b"ready\n"
    assert len(group_alive(leader.pid)) == 2
    yield leader.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
    leader.stdout.close()


def test_sigterm_alone_does_not_end_the_group(stubborn_group: int) -> None:
    """The premise of the tests below."""
    os.killpg(stubborn_group, signal.SIGTERM)
    time.sleep(0.3)
    assert len(group_alive(stubborn_group)) == 2


def test_end_group_escalates_to_sigkill_after_the_grace(stubborn_group: int) -> None:
    started = time.monotonic()
    survivors = asyncio.run(process.end_group(stubborn_group, grace=0.3))
    assert survivors == []
    assert group_alive(stubborn_group) == []
    assert time.monotonic() - started >= 0.3  # SIGTERM was given its grace first


def test_kill_group_now_leaves_nobody(stubborn_group: int) -> None:
    assert process.kill_group_now(stubborn_group) == []
    assert group_alive(stubborn_group) == []
