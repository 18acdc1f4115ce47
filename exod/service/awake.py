"""Keep the machine from idle sleep while exod serves, and let it sleep again once idle.

A Mac that dozes off mid-generation stalls the run and drops out of its cluster. The hold is a
child process that holds an assertion for as long as it lives:

- macOS: `caffeinate -i -w PID` prevents idle system sleep; `-w` makes it end by itself when exod
  ends, even by SIGKILL, so a hold never outlives exod.
- Linux: `systemd-inhibit --what=idle:sleep ... cat`, whose `cat` reads a pipe that only exod
  holds the other end of: when exod ends, however, `cat` reads the end of it and the lock goes.
  Without logind (a container) systemd-inhibit exits at once; that is said once and not retried.
- Elsewhere: nothing.

`KeepAwake` is what the rest of exod talks to: Runs tells it of every run admitted and every
run ended; it takes the hold with the first and releases it RELEASE_AFTER_S after the last, so
that a client sending runs one after another does not spawn a hold per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("exod.awake")

CAFFEINATE = "/usr/bin/caffeinate"
# Long enough to see a gap between two runs of one client, short enough to let the machine sleep.
RELEASE_AFTER_S = 5.0
# When a hold is checked after it was taken: one that ended by then never held (systemd-inhibit
# without logind exits at once), one still running holds. Checked then rather than at the
# release, so that the log says either when it happens.
CHECK_AFTER_S = 1.0
# How long a hold is given to end on SIGTERM before SIGKILL.
END_WAIT_S = 1.0


def wanted(runs_in_flight: int, ranks_held: int = 0) -> bool:
    """Whether this machine must stay awake (pure).

    `runs_in_flight`: runs admitted and not finished, queued ones included (a queued run is
    waiting for a runner that is working). `ranks_held`: ranks of a distributed model this node
    holds for a cluster (issue 12); a node holding one is needed by the others even when none of
    its own runs is in flight.
    """
    return runs_in_flight > 0 or ranks_held > 0


def hold_command(platform: str, pid: int, which: Callable[[str], str | None]) -> list[str] | None:
    """The command whose process holds the machine awake while it lives (pure); None where
    there is none.

    `pid` is exod's: caffeinate ends when it does. On Linux the command's `cat` reads the pipe
    that the adapter gives it as stdin instead, which works without a pid.
    """
    if platform == "darwin":
        return [CAFFEINATE, "-i", "-w", str(pid)]
    if platform.startswith("linux"):
        inhibit = which("systemd-inhibit")
        cat = which("cat")
        if inhibit is None or cat is None:
            return None
        return [
            inhibit,
            "--what=idle:sleep",
            "--who=exod",
            "--why=serving a run",
            "--mode=block",
            cat,
        ]
    return None


class Hold:
    """One child process that holds the assertion while it lives (the adapter).

    The child runs in a session of its own, so that releasing it ends everything it started
    (systemd-inhibit's `cat`) by its process group. A hold that could not be taken, or that
    ended by itself, is said once at info and never tried again in this exod's life.
    """

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self.failed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._said = False  # whether "keeping this machine awake" was logged for this child

    @property
    def held(self) -> bool:
        return self._proc is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def take(self) -> None:
        """Start the child, unless it is running or a hold failed before."""
        if self._proc is not None or self.failed:
            return
        try:
            self._proc = subprocess.Popen(  # a fixed command, see hold_command
                self.command,
                stdin=subprocess.PIPE,  # the pipe whose end ends systemd-inhibit's cat
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            self._fail(f"{self.command[0]} could not be started: {e.strerror or e}")
            return
        self._said = False
        log.debug("started %s (pid %d)", self.command, self._proc.pid)

    def check(self) -> None:
        """Say that the hold holds, once it has lived CHECK_AFTER_S; or that it ended by itself
        (systemd-inhibit without logind exits at once, so saying "keeping" at the start would
        be followed by its opposite)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is not None:
            self._proc = None
            self._ended_by_itself(proc)
        elif not self._said:
            self._said = True
            name = Path(self.command[0]).name
            log.info("keeping this machine awake while it serves (%s, pid %d)", name, proc.pid)

    def release(self) -> None:
        """End the child (by its process group) and reap it; nothing when none runs."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is not None:
            self._ended_by_itself(proc)
            return
        _end(proc)
        if self._said:
            log.info("no longer keeping this machine awake: nothing to serve")

    def _ended_by_itself(self, proc: subprocess.Popen[bytes]) -> None:
        detail = _stderr_line(proc)
        _close_pipes(proc)
        said = f": {detail}" if detail else ""
        self._fail(f"{Path(self.command[0]).name} ended with status {proc.returncode}{said}")

    def _fail(self, why: str) -> None:
        self.failed = True
        log.info(
            "cannot keep this machine awake while it serves (%s); it may sleep mid-run. "
            "Not trying again until exod restarts; EXOD_KEEP_AWAKE=0 stops trying at all",
            why,
        )


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's process group, SIGKILL after END_WAIT_S; reaped either way.

    The child was not reaped yet (poll() said it runs), so its pid, and its group's id, are still
    its own.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(END_WAIT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _close_pipes(proc)


def _stderr_line(proc: subprocess.Popen[bytes]) -> str:
    """The last line the ended child wrote on stderr, without waiting for more (something it
    started may still hold the pipe open)."""
    if proc.stderr is None:
        return ""
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        text = os.read(fd, 4096).decode(errors="replace")
    except OSError:  # BlockingIOError: nothing was written
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class KeepAwake:
    """Holds while a run is in flight; releases RELEASE_AFTER_S after the last one ended.

    Runs calls `run_started` once a run is admitted (its RunAccepted logged) and `run_ended`
    when it ends, whichever way (done, error, cancel, runner death): the same two places that
    log the run, so the hold follows what `exoctl status` shows. Calls come from the event loop,
    where the hold is started and ended directly: a fork and exec at the start of a busy spell,
    a SIGTERM at its end (the wait for the child's end is long only for one that ignores
    SIGTERM, which neither caffeinate nor systemd-inhibit does).
    """

    def __init__(
        self,
        hold: Hold | None,
        release_after: float = RELEASE_AFTER_S,
        check_after: float = CHECK_AFTER_S,
    ) -> None:
        self.hold = hold
        self._release_after = release_after
        self._check_after = check_after
        self._runs: set[str] = set()
        self._release: asyncio.TimerHandle | None = None
        self._check: asyncio.TimerHandle | None = None

    @classmethod
    def for_this_machine(cls, enabled: bool) -> KeepAwake:
        """The KeepAwake of this exod: off when EXOD_KEEP_AWAKE=0 or nothing can hold."""
        command = hold_command(sys.platform, os.getpid(), shutil.which) if enabled else None
        if command is None:
            log.debug("not keeping this machine awake while it serves (%s)", sys.platform)
        return cls(Hold(command) if command is not None else None)

    def run_started(self, run_id: str) -> None:
        self._runs.add(run_id)
        self._update()

    def run_ended(self, run_id: str) -> None:
        self._runs.discard(run_id)
        self._update()

    def close(self) -> None:
        """exod is stopping: release now."""
        for timer in (self._release, self._check):
            if timer is not None:
                timer.cancel()
        self._release = self._check = None
        if self.hold is not None:
            self.hold.release()

    def _update(self) -> None:
        hold = self.hold
        if hold is None:
            return
        if wanted(len(self._runs)):
            if self._release is not None:
                self._release.cancel()
                self._release = None
            if not hold.held and not hold.failed:
                hold.take()
                if hold.held:
                    loop = asyncio.get_running_loop()
                    self._check = loop.call_later(self._check_after, hold.check)
        elif hold.held and self._release is None:
            self._release = asyncio.get_running_loop().call_later(
                self._release_after, self._release_now
            )

    def _release_now(self) -> None:
        self._release = None
        if self.hold is not None:
            self.hold.release()
