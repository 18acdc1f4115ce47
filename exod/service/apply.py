"""Carrying out a plan (plan.py): writing and removing its files, running its commands."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from exod.service.plan import Command, FileStep, MakeDir, Remove, Write

# launchctl and systemctl answer in well under a second; one that hangs has a problem of its own.
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    command: Command
    returncode: int
    output: str  # stderr, else stdout, on one line: for messages
    stdout: str = ""  # as printed: for parsing

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(command: Command, timeout: float = COMMAND_TIMEOUT_S) -> Outcome:
    try:
        done = subprocess.run(
            command.argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        return Outcome(command, 127, f"{command.argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Outcome(command, 124, f"did not finish within {timeout:g} s")
    text = " ".join((done.stderr.strip() or done.stdout.strip()).split())
    return Outcome(command, done.returncode, text, done.stdout)


def unreachable(probe: Command) -> str | None:
    """Why the user's service manager does not answer, or None when it does."""
    outcome = run(probe)
    if outcome.ok:
        return None
    return outcome.output or f"exit status {outcome.returncode}"


def apply_files(steps: Sequence[FileStep]) -> None:
    for step in steps:
        if isinstance(step, Write):
            step.path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed: a service manager never reads half a file.
            tmp = step.path.with_name(f".{step.path.name}.tmp")
            tmp.write_bytes(step.content)
            os.chmod(tmp, step.mode)
            tmp.replace(step.path)
        elif isinstance(step, MakeDir):
            step.path.mkdir(parents=True, exist_ok=True)
        elif step.path.is_dir() and not step.path.is_symlink():
            shutil.rmtree(step.path)
        else:
            step.path.unlink(missing_ok=True)


def describe_done(step: FileStep) -> str:
    if isinstance(step, Write):
        return f"wrote {step.path}"
    if isinstance(step, MakeDir):
        return f"made {step.path}"
    assert isinstance(step, Remove)
    return f"removed {step.path}"
