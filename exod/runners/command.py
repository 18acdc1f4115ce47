"""The command line and environment a runner is started with (pure)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def shim_command(lifeline_fd: int, parent: int, command: Sequence[str]) -> list[str]:
    """`command` under the shim, which leads the process group and owns the lifeline."""
    return [
        sys.executable,
        "-m",
        "exod.runners.shim",
        "--lifeline",
        str(lifeline_fd),
        "--parent",
        str(parent),
        "--",
        *command,
    ]


def runner_command(
    lifeline_fd: int, pipe_fd: int, parent: int, wrapper: Sequence[str]
) -> list[str]:
    """shim → [wrapper …] → runner; the shim leads the group and owns the lifeline."""
    runner = [sys.executable, "-m", "exod.runners.runner", "--fd", str(pipe_fd)]
    return shim_command(lifeline_fd, parent, [*wrapper, *runner])


def runner_env(base: Mapping[str, str], home: Path, runner_id: str) -> dict[str, str]:
    return {
        **base,
        # Runners never reach a model hub nor run code shipped with a model.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # Lets anyone (tests, an admin with `ps e`) tell which exod a runner belongs to.
        "EXOD_HOME": str(home),
        "EXOD_RUNNER_ID": runner_id,
    }
