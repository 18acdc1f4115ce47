"""The shim, the runner's group leader, on real (tiny) process groups without exod or MLX.

It must pass the runner's exit on unchanged, outlive a SIGTERM meant for the runner, and end
its whole group (grandchildren included) when exod goes away: by the lifeline's end of file,
and on Linux by the parent-death signal even while the lifeline stays open.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.daemon import group_alive, wait_until

# A runner stand-in that starts a child of its own, as a wrapper or MLX helper might.
WITH_CHILD = ["sh", "-c", "sleep 600 & exec sleep 600"]


@dataclass
class Shim:
    proc: subprocess.Popen[bytes]
    lifeline: int  # our write end; closing it is exod dying

    @property
    def pgid(self) -> int:
        return self.proc.pid


def start_shim(command: list[str], *, parent: int = 0) -> Shim:
    read_end, write_end = os.pipe()
    args = [sys.executable, "-m", "exod.runners.shim", "--lifeline", str(read_end)]
    if parent:
        args += ["--parent", str(parent)]
    proc = subprocess.Popen(
        [*args, "--", *command],
        pass_fds=(read_end,),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(read_end)
    return Shim(proc, write_end)


@pytest.fixture
def shims() -> Iterator[list[Shim]]:
    made: list[Shim] = []
    yield made
    for shim in made:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shim.pgid, signal.SIGKILL)
        shim.proc.wait()
        with contextlib.suppress(OSError):
            os.close(shim.lifeline)
        if shim.proc.stderr is not None:
            shim.proc.stderr.close()


def started(shims: list[Shim], command: list[str], members: int = 0) -> Shim:
    shim = start_shim(command)
    shims.append(shim)
    if members:
        assert wait_until(lambda: len(group_alive(shim.pgid)) == members, timeout=10), group_alive(
            shim.pgid
        )
    return shim


def test_the_runners_exit_status_is_the_shims(shims: list[Shim]) -> None:
    shim = started(shims, ["sh", "-c", "exit 3"])
    assert shim.proc.wait(timeout=10) == 3


@pytest.mark.parametrize(
    "sig", [signal.SIGSEGV, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name
)
def test_a_runner_killed_by_a_signal_kills_the_shim_with_it(
    shims: list[Shim], sig: signal.Signals
) -> None:
    shim = started(shims, ["sh", "-c", f"kill -{sig.name.removeprefix('SIG')} $$"])
    assert shim.proc.wait(timeout=10) == -sig


def test_a_command_that_cannot_start_exits_127(shims: list[Shim]) -> None:
    shim = started(shims, ["/nonexistent/runner"])
    assert shim.proc.wait(timeout=10) == 127
    assert shim.proc.stderr is not None
    assert b"cannot start '/nonexistent/runner'" in shim.proc.stderr.read()


def test_sigterm_to_the_group_ends_the_runner_and_the_shim_follows(shims: list[Shim]) -> None:
    shim = started(shims, WITH_CHILD, members=3)
    os.killpg(shim.pgid, signal.SIGTERM)
    # The shim ignored it and left only once the runner had gone, the runner's way.
    assert shim.proc.wait(timeout=10) == -signal.SIGTERM
    assert wait_until(lambda: not group_alive(shim.pgid), timeout=2)


def test_end_of_the_lifeline_kills_the_whole_group(shims: list[Shim]) -> None:
    shim = started(shims, WITH_CHILD, members=3)
    os.close(shim.lifeline)
    closed = time.monotonic()
    assert wait_until(lambda: not group_alive(shim.pgid), timeout=2), group_alive(shim.pgid)
    assert time.monotonic() - closed < 2
    assert shim.proc.wait(timeout=10) == -signal.SIGKILL


def test_a_shim_whose_parent_is_already_gone_kills_its_group_at_once(shims: list[Shim]) -> None:
    # --parent names a pid that is not the shim's parent: exod died before the shim started.
    shim = start_shim(["sleep", "600"], parent=1)
    shims.append(shim)
    assert shim.proc.wait(timeout=10) == -signal.SIGKILL
    assert wait_until(lambda: not group_alive(shim.pgid), timeout=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_parent_death_kills_the_group_even_while_the_lifeline_is_open() -> None:
    """The second line: the lifeline's write end lives on elsewhere, yet the group goes."""
    read_end, write_end = os.pipe()
    starter = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'exod.runners.shim', '--lifeline', "
        f"'{read_end}', '--', 'sh', '-c', 'sleep 600 & exec sleep 600'], pass_fds=({read_end},), "
        "start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", starter], pass_fds=(read_end,), stdout=subprocess.PIPE
    )
    os.close(read_end)
    pgid = 0
    try:
        assert parent.stdout is not None
        pgid = int(parent.stdout.readline())
        assert wait_until(lambda: len(group_alive(pgid)) == 3, timeout=10), group_alive(pgid)
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        assert wait_until(lambda: not group_alive(pgid), timeout=2), group_alive(pgid)
        assert time.monotonic() - killed < 2
    finally:
        os.close(write_end)
        if parent.stdout is not None:
            parent.stdout.close()
        if pgid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
