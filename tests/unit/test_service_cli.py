"""exoctl with no daemon: every command that needs exod says how to start it, as a service or
in the foreground; `exoctl service status` says what is missing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from exoctl.cli import cli
from exoctl.service import status_problem

SOCKET = "/tmp/exoctl-test-none/exod.sock"  # never created: nothing listens there


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["kill", "--all"],
        ["events"],
        ["models", "list"],
        ["models", "demo"],
        ["run", "demo", "hi"],
    ],
)
def test_with_exod_down_every_command_says_how_to_start_it(args: list[str]) -> None:
    result = CliRunner().invoke(cli, [*args, "--socket", SOCKET], prog_name="exoctl")
    assert result.exit_code == 69, (result.stderr, result.exception)
    (line,) = result.stderr.splitlines()
    assert "start it with `exod` (or `exoctl service install`)" in line


def test_status_problem_names_the_next_step() -> None:
    assert status_problem(installed=False, why_not=None, health="unreachable") == (
        "exod is not running and is not installed as a service",
        "start it with `exoctl service install`, or `exod` in the foreground",
    )
    assert "`exoctl service logs`" in status_problem(True, None, "unreachable")[1]
    assert "`exoctl service logs`" in status_problem(True, None, "not_serving")[1]
    assert status_problem(True, "no bus", "unreachable")[0].endswith(
        "no user service manager answers"
    )
