"""exoctl with no daemon: every command that needs exod says how to start it, as a service or
in the foreground; `exoctl service status` says what is true, whether or not a user service
manager answers, and never takes an exod started by hand for the service."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from exoctl.cli import cli
from exod.service.holder import Holder
from exod.service.paths import PLATFORMS, this_platform
from exod.service.report import Findings, Health, lines, logs_problem, problem
from exod.service.state import NOT_LOADED, ServiceState

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


# --- what status concludes ------------------------------------------------------------------------

UNIT = Path("/h/.config/systemd/user/exod.service")
HOME = Path("/h/.local/state/exod")
RUNNING = ServiceState(loaded=True, running=True, pid=4242, detail="active (running)")
FAILED = ServiceState(loaded=True, running=False, pid=None, detail="failed (failed)")
HAND = Holder(pid=1234, by_service=False)
SERVICE = Holder(pid=4242, by_service=True)
RESTART = "systemctl --user restart exod.service"


def findings(
    *,
    installed: bool = True,
    manager_error: str | None = None,
    state: ServiceState = NOT_LOADED,
    health: Health = "unreachable",
    holder: Holder | None = None,
) -> Findings:
    return Findings(
        platform="linux",
        files={UNIT: installed},
        manager_error=manager_error,
        state=state,
        health=health,
        home=HOME,
        socket=HOME / "exod.sock",
        holder=holder,
        restart=RESTART,
    )


def test_the_service_is_up_only_when_its_manager_runs_the_exod_that_answers() -> None:
    assert problem(findings(state=RUNNING, health="serving", holder=SERVICE)) is None


def test_an_exod_started_by_hand_is_not_the_service_even_when_it_serves() -> None:
    no_manager = findings(installed=False, manager_error="no bus", health="serving", holder=HAND)
    assert problem(no_manager) == (
        "no user service manager answers (no bus), so exod does not run as a service; "
        f"exod (pid 1234) on {HOME} was started by hand",
        "it serves exoctl as it is, but nothing restarts it; for a service, install where a "
        "user service manager runs (docs/install.md)",
    )
    # The manager answers, the unit is installed, and the hand-started exod holds the home: the
    # service's exod cannot start, which is what to fix.
    blocking = findings(state=FAILED, health="serving", holder=HAND)
    assert problem(blocking) == (
        f"exod (pid 1234), started by hand, holds {HOME}, so the service's exod cannot start",
        f"stop it (`kill 1234`), then `{RESTART}`",
    )
    not_installed = findings(installed=False, health="serving", holder=HAND)
    assert problem(not_installed) == (
        f"exod (pid 1234) runs on {HOME}, started by hand; exod is not installed as a service",
        "to run it as one, stop it (`kill 1234`) and run `exoctl service install`",
    )


def test_status_says_what_to_do_when_nothing_answers() -> None:
    assert problem(findings(installed=False)) == (
        "exod is not running and is not installed as a service",
        "start it with `exoctl service install`, or `exod` in the foreground",
    )
    assert problem(findings(installed=False, manager_error="no bus")) == (
        "exod is not running and is not installed as a service, and no user service manager "
        "answers (no bus)",
        "run exod by hand (`exod`, in the foreground); for a service, see docs/install.md",
    )
    assert problem(findings(manager_error="no bus")) == (
        "the service is installed, but no user service manager answers (no bus), so exod is "
        "not running",
        "run exod by hand (`exod`), or see docs/install.md",
    )
    assert problem(findings(state=FAILED)) == (
        "the service is installed but exod does not answer",
        "`exoctl service logs` says why",
    )
    assert problem(findings(state=RUNNING, health="not_serving", holder=SERVICE)) == (
        "exod answers but fails its self-check",
        "`exoctl service logs` says why",
    )


def test_an_exod_on_the_socket_with_another_home_is_not_the_service() -> None:
    assert problem(findings(state=FAILED, health="serving")) == (
        f"an exod answers on {HOME / 'exod.sock'}, but the service is not running "
        "(failed (failed))",
        "stop that exod, then `exoctl service install`",
    )


def test_status_lines_name_the_pid_and_who_started_it() -> None:
    shown = lines(findings(installed=False, manager_error="no bus", health="serving", holder=HAND))
    assert shown == [
        "platform  linux",
        f"installed no: {UNIT} (missing)",
        "manager   not reachable: no bus",
        f"exod      serving on {HOME / 'exod.sock'}, pid 1234, started by hand",
        f"home      {HOME}",
    ]


def test_logs_without_a_manager_say_where_exods_log_is() -> None:
    assert logs_problem("no bus", HOME, HAND) == (
        "no user service manager answers (no bus), so there is no service log",
        f"exod (pid 1234) was started by hand and logs to its own stderr; its runners log to "
        f"{HOME / 'runners'}",
    )
    assert logs_problem("no bus", HOME, None)[1].startswith("an exod started by hand logs to")


# --- the other platform ---------------------------------------------------------------------------

OTHER = next(p for p in PLATFORMS if p != this_platform())


@pytest.mark.parametrize("command", ["install", "uninstall", "status", "logs"])
def test_the_other_platform_works_only_with_dry_run(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["service", command, "--platform", OTHER], prog_name="exoctl")
    assert result.exit_code == 64, (result.stderr, result.exception)
    assert result.stderr == (
        f"exoctl: --platform {OTHER} is not this machine's platform, so only --dry-run works "
        f"with it. run `exoctl service {command} --dry-run --platform {OTHER}`, or leave out "
        "--platform\n"
    )
    assert result.stdout == ""
    assert not (tmp_path / "home").exists()
