"""`exoctl service`: install exod as a login service (launchd on macOS, systemd --user on Linux),
remove it, show how it is doing, and show its log.

What each command writes and runs is a plan from exod/service/plan.py; `--dry-run` prints the
plan instead of carrying it out, and `--platform` picks either platform's plan on any machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

import exod
from exoctl.arguments import default_socket
from exoctl.failures import Failure, one_line
from exoctl.options import json_option
from exoctl.terminal import print_json, print_lines, say
from exod import __version__
from exod.errors import Exit
from exod.service import apply, localnet
from exod.service import plan as plans
from exod.service.paths import PLATFORMS, LinuxPaths, MacPaths, Platform, this_platform
from exod.service.state import NOT_LOADED, ServiceState, from_launchctl_print, from_systemctl_show

F = TypeVar("F", bound=Callable[..., Any])

HEALTH_TIMEOUT_S = 3.0
# How much of the log `status` reads for the Local Network denial (macOS).
LOG_TAIL_BYTES = 64 * 1024


def platform_option(f: F) -> F:
    return click.option(
        "--platform",
        type=click.Choice(PLATFORMS),
        default=this_platform(),
        show_default=True,
        help="Whose service: macOS (launchd) or Linux (systemd --user).",
    )(f)


def dry_run_option(f: F) -> F:
    return click.option(
        "--dry-run", is_flag=True, help="Print the files and commands; change nothing."
    )(f)


@click.group("service")
def service_group() -> None:
    """Run exod as a service that starts at login and restarts when it fails.

    macOS: a LaunchAgent that starts exod through exod.app, the bundle that lets it use the
    local network. Linux: a systemd user unit (Type=notify, with a watchdog).

    \b
    Examples:
      exoctl service install --dry-run     what would be written and run
      exoctl service install               write the files, start exod
      exoctl service status
      exoctl service logs --follow
      exoctl service uninstall
    """


# --- install and uninstall ----------------------------------------------------------------------


def find_exod() -> Path:
    """The exod that belongs to this exoctl: beside its python (a venv, pipx, uv tool), else the
    first on PATH. Never resolved: a venv's python is a link out of the venv."""
    beside = Path(sys.executable).parent / "exod"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("exod")
    if found:
        return Path(found).absolute()
    raise Failure(
        Exit.NOT_FOUND,
        one_line(
            f"found no exod beside {sys.executable} nor on PATH",
            "install exod and exoctl together (`pipx install exod`, see docs/install.md)",
        ),
    )


def source_checkout() -> Path:
    """The source checkout that this exoctl's exod package comes from, for --from-source."""
    root = Path(exod.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise Failure(
            Exit.USAGE,
            one_line(
                f"--from-source needs exoctl to run from a source checkout, but exod comes "
                f"from {root}",
                "run the checkout's own exoctl (`.venv/bin/exoctl` after `./dev setup`)",
            ),
        )
    return root


def install_plan(platform: Platform, from_source: bool) -> plans.Plan:
    source = source_checkout() if from_source else None
    program = find_exod()
    if source is not None and (source / ".venv" / "bin" / "exod").is_file():
        program = source / ".venv" / "bin" / "exod"  # the checkout's own environment
    service = plans.service_for(program, os.environ, source)
    if platform == "macos":
        return plans.macos_install(MacPaths.of(os.environ), service, __version__, os.getuid())
    return plans.linux_install(LinuxPaths.of(os.environ), service)


def uninstall_plan(platform: Platform) -> plans.Plan:
    if platform == "macos":
        return plans.macos_uninstall(MacPaths.of(os.environ), os.getuid())
    return plans.linux_uninstall(LinuxPaths.of(os.environ))


def carry_out(plan: plans.Plan, dry_run: bool) -> None:
    """Do what the plan says, reporting each step on stdout; exit 69 when the service manager
    cannot be reached or refuses a step (the files are changed all the same)."""
    if dry_run:
        print_lines(plans.describe(plan))
        print_lines([f"note   {note}" for note in plan.notes])
        return
    why_not = apply.unreachable(plan.probe)
    if why_not is None:
        for command in plan.before:
            _run(command)
    try:
        apply.apply_files(plan.files)
    except OSError as e:
        code = Exit.PERMISSION if isinstance(e, PermissionError) else Exit.INTERNAL
        raise Failure(code, one_line(f"cannot change the service's files: {e}", "")) from None
    print_lines([apply.describe_done(step) for step in plan.files])
    if why_not is not None:
        pending = "; ".join(f"`{c}`" for c in plan.after) or "nothing more"
        raise Failure(
            Exit.UNAVAILABLE,
            one_line(
                f"the files are in place, but no user service manager answers "
                f"(`{plan.probe}`: {why_not})",
                f"nothing was started or stopped; where one runs, do: {pending}",
            ),
        )
    for command in plan.after:
        _run(command)
    for note in plan.notes:
        say(note)


def _run(command: plans.Command) -> None:
    outcome = apply.run(command)
    if outcome.ok or command.may_fail:
        click.echo(f"ran {command}")
        return
    raise Failure(
        Exit.UNAVAILABLE,
        one_line(
            f"`{command}` failed with exit status {outcome.returncode}: {outcome.output}",
            "`exoctl service logs` shows exod's side",
        ),
    )


@service_group.command("install")
@click.option(
    "--from-source",
    is_flag=True,
    help="Run this source checkout's code (PYTHONPATH), so that a change takes effect at the "
    "next restart without a build step.",
)
@platform_option
@dry_run_option
def install_command(*, from_source: bool, platform: Platform, dry_run: bool) -> None:
    """Install exod as a login service and start it.

    macOS: writes ~/Applications/exod.app and ~/Library/LaunchAgents/org.exod.daemon.plist and
    runs `launchctl bootstrap gui/UID`. Linux: writes ~/.config/systemd/user/exod.service and
    runs `systemctl --user enable --now`. The EXOD_* settings of this shell go with it.
    Installing again replaces the files and restarts exod. Where no user service manager answers
    the files are written anyway and exoctl exits 69.

    \b
    Examples:
      exoctl service install --dry-run --platform macos
      EXOD_HOME=/data/exod exoctl service install
      .venv/bin/exoctl service install --from-source
    """
    carry_out(install_plan(platform, from_source), dry_run)


@service_group.command("uninstall")
@platform_option
@dry_run_option
def uninstall_command(*, platform: Platform, dry_run: bool) -> None:
    """Stop the service and remove everything `install` wrote (exod's state and log stay).

    \b
    Examples:
      exoctl service uninstall --dry-run
      exoctl service uninstall
    """
    carry_out(uninstall_plan(platform), dry_run)


# --- status -------------------------------------------------------------------------------------


def exod_health(socket: Path) -> str:
    """`serving`, `not_serving` (exod answers but its self-check fails) or `unreachable`."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # only `status` needs it

    try:
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S
            )
    except grpc.RpcError:
        return "unreachable"
    return "serving" if reply.status == health_pb2.HealthCheckResponse.SERVING else "not_serving"


def manager_state(platform: Platform) -> tuple[str | None, ServiceState]:
    """(why the service manager does not answer, or None; what it says about exod)."""
    if platform == "macos":
        why_not = apply.unreachable(plans.macos_probe(os.getuid()))
        if why_not is not None:
            return why_not, NOT_LOADED
        outcome = apply.run(plans.macos_status(os.getuid()))
        return None, from_launchctl_print(outcome.stdout) if outcome.ok else NOT_LOADED
    why_not = apply.unreachable(plans.linux_probe())
    if why_not is not None:
        return why_not, NOT_LOADED
    outcome = apply.run(plans.linux_status())
    return None, from_systemctl_show(outcome.stdout) if outcome.ok else NOT_LOADED


def log_tail(path: Path) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def installed_files(platform: Platform) -> list[Path]:
    if platform == "macos":
        paths = MacPaths.of(os.environ)
        return [paths.agent, paths.launcher]
    return [LinuxPaths.of(os.environ).unit]


@service_group.command("status")
@platform_option
@dry_run_option
@json_option
def status_command(*, platform: Platform, dry_run: bool, as_json: bool) -> None:
    """Whether the service is installed, what its manager says, and whether exod answers.

    Exits 0 when exod answers and passes its self-check, else 69 with what to do.

    \b
    Examples:
      exoctl service status
      exoctl service status --json | jq .exod
    """
    files = installed_files(platform)
    socket = default_socket(os.environ)
    if dry_run:
        probe = plans.macos_probe(os.getuid()) if platform == "macos" else plans.linux_probe()
        shown = plans.macos_status(os.getuid()) if platform == "macos" else plans.linux_status()
        print_lines(
            [
                *(f"check  {path} exists" for path in files),
                f"run    {probe}",
                f"run    {shown}",
                f"check  grpc.health.v1.Health/Check on {socket}",
            ]
        )
        return
    installed = all(path.exists() for path in files)
    why_not, state = manager_state(platform)
    health = exod_health(socket)
    denied = platform == "macos" and localnet.in_log(log_tail(MacPaths.of(os.environ).log))
    report = {
        "platform": platform,
        "installed": installed,
        "files": {str(path): path.exists() for path in files},
        "manager": {
            "reachable": why_not is None,
            "error": why_not,
            "loaded": state.loaded,
            "running": state.running,
            "pid": state.pid,
            "detail": state.detail,
        },
        "exod": health,
        "socket": str(socket),
        "local_network_denied": denied,
    }
    if as_json:
        print_json(report)
    else:
        print_lines(status_lines(report))
    if denied:
        say(localnet.ADVICE)
    if health != "serving":
        raise Failure(Exit.UNAVAILABLE, one_line(*status_problem(installed, why_not, health)))


def status_lines(report: dict[str, Any]) -> list[str]:
    manager = report["manager"]
    if not manager["reachable"]:
        said = f"not reachable: {manager['error']}"
    else:
        said = manager["detail"] + (f", pid {manager['pid']}" if manager["pid"] else "")
    files = ", ".join(f"{p}{'' if ok else ' (missing)'}" for p, ok in report["files"].items())
    return [
        f"platform  {report['platform']}",
        f"installed {'yes' if report['installed'] else 'no'}: {files}",
        f"manager   {said}",
        f"exod      {report['exod'].replace('_', ' ')} on {report['socket']}",
    ]


def status_problem(installed: bool, why_not: str | None, health: str) -> tuple[str, str]:
    """(what is wrong, what to do) when exod does not serve."""
    if health == "not_serving":
        return "exod answers but fails its self-check", "`exoctl service logs` says why"
    if not installed:
        return (
            "exod is not running and is not installed as a service",
            "start it with `exoctl service install`, or `exod` in the foreground",
        )
    if why_not is not None:
        return "exod is not running, and no user service manager answers", "see docs/install.md"
    return "the service is installed but exod does not answer", "`exoctl service logs` says why"


# --- logs ---------------------------------------------------------------------------------------


@service_group.command("logs")
@click.option(
    "--lines", "-n", type=click.IntRange(min=0), default=50, show_default=True, metavar="N"
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines; Ctrl-C stops.")
@platform_option
@dry_run_option
def logs_command(*, lines: int, follow: bool, platform: Platform, dry_run: bool) -> None:
    """Print the service's log: launchd's log file on macOS, the user journal on Linux.

    \b
    Examples:
      exoctl service logs -n 200
      exoctl service logs --follow
    """
    if platform == "macos":
        command = plans.macos_logs(MacPaths.of(os.environ), lines, follow)
    else:
        command = plans.linux_logs(lines, follow)
    if dry_run:
        click.echo(f"run    {command}")
        return
    try:
        code = subprocess.call(command.argv, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise Failure(
            Exit.UNAVAILABLE,
            one_line(f"cannot show the log: {command.argv[0]} is not installed", ""),
        ) from None
    except KeyboardInterrupt:
        return  # the way to stop --follow
    if code != 0:
        raise Failure(
            Exit.UNAVAILABLE,
            one_line(
                f"`{command}` exited {code}", "is the service installed? `exoctl service status`"
            ),
        )
