"""`exoctl service`: install exod as a login service (launchd on macOS, systemd --user on Linux),
remove it, show how it is doing, and show its log.

What each command writes and runs is a plan from exod/service/plan.py; `--dry-run` prints the
plan instead of carrying it out, and `--platform` picks either platform's plan on any machine
(the other machine's only with `--dry-run`). Before it makes an install plan, exoctl checks that
the service could start: its settings pass exod's own parser (else 78), and no exod started by
hand holds its home (else 75).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

import exod
from exoctl import interrupt
from exoctl.failures import Failure, one_line
from exoctl.group import Group
from exoctl.interrupt import Ending
from exoctl.options import json_option
from exoctl.terminal import print_json, print_lines, say
from exod import __version__, config
from exod.errors import Exit
from exod.service import apply, holder, localnet, report, settings
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
        help="Whose service: macOS (launchd) or Linux (systemd --user); the other machine's "
        "only with --dry-run.",
    )(f)


def dry_run_option(f: F) -> F:
    return click.option(
        "--dry-run", is_flag=True, help="Print the files and commands; change nothing."
    )(f)


def require_this_platform(platform: Platform, dry_run: bool) -> None:
    """The other platform's files mean nothing to this machine's service manager: they are for
    reading (--dry-run), never for writing here."""
    if platform == this_platform() or dry_run:
        return
    command = click.get_current_context().command_path
    raise Failure(
        Exit.USAGE,
        one_line(
            f"--platform {platform} is not this machine's platform, so only --dry-run works "
            "with it",
            f"run `{command} --dry-run --platform {platform}`, or leave out --platform",
        ),
    )


@click.group("service", cls=Group)
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


def exod_setting_options(f: F) -> F:
    """exod's own setting flags (`exod --help`), each baked into the service as its variable."""
    for s in reversed(config.SETTINGS):
        f = click.option(s.flag, s.name, metavar="VALUE", help=f"{s.help} ({s.env}).")(f)
    return f


def checked_settings(platform: Platform, flags: Mapping[str, str | None]) -> dict[str, str]:
    """This shell's EXOD_* settings and the flags given, as the service will carry them, or 78
    with exod's words."""
    try:
        return settings.baked_environment(os.environ, platform, flags)
    except config.ConfigError as e:
        raise Failure(
            Exit.CONFIG,
            one_line(
                f"the service's exod would not start: {e}",
                "nothing was installed; fix the setting (`exod --help` lists them), then run "
                "`exoctl service install` again",
            ),
        ) from None


def refuse_if_held(home: Path) -> None:
    """75 when an exod started by hand holds the home: the service's own would exit 75 at every
    start, and its manager would restart it in a loop."""
    found = holder.holder(home)
    if found is None or found.by_service:
        return  # the service's own exod is stopped by the plan before the new one starts
    raise Failure(
        Exit.TEMPFAIL,
        one_line(
            f"{report.who(found)} is already running on {home}, started by hand, so the "
            "service's exod could not take that home",
            f"nothing was installed; {report.stop_it(found)} and run `exoctl service install` "
            "again, or give the service another home (`exoctl service install --home DIR`)",
        ),
    )


def install_plan(
    platform: Platform, from_source: bool, environment: Mapping[str, str]
) -> plans.Plan:
    source = source_checkout() if from_source else None
    program = find_exod()
    if source is not None and (source / ".venv" / "bin" / "exod").is_file():
        program = source / ".venv" / "bin" / "exod"  # the checkout's own environment
    service = plans.service_for(program, environment, source)
    if platform == "macos":
        return plans.macos_install(MacPaths.of(os.environ), service, __version__, os.getuid())
    return plans.linux_install(LinuxPaths.of(os.environ), service)


def uninstall_plan(platform: Platform) -> plans.Plan:
    if platform == "macos":
        return plans.macos_uninstall(MacPaths.of(os.environ), os.getuid())
    return plans.linux_uninstall(LinuxPaths.of(os.environ))


def present(steps: tuple[plans.FileStep, ...]) -> tuple[plans.FileStep, ...]:
    return tuple(s for s in steps if s.path.exists() or s.path.is_symlink())


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
        raise Failure(Exit.UNAVAILABLE, unreachable_line(plan, why_not))
    for command in plan.after:
        _run(command)
    for note in plan.notes:
        say(note)


def unreachable_line(plan: plans.Plan, why_not: str) -> str:
    """What was and was not done when no user service manager answers."""
    pending = "; ".join(f"`{c}`" for c in plan.after)
    manager = f"no user service manager answers (`{plan.probe}`: {why_not})"
    if plan.action == "install":
        return one_line(
            f"wrote the service's files, but {manager}, so exod was not started",
            f"where one runs, do: {pending}; until then, run exod by hand: `exod`",
        )
    return one_line(
        f"removed the service's files, but {manager}, so nothing was stopped",
        f"where one runs, do: {pending}",
    )


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
@exod_setting_options
def install_command(
    *, from_source: bool, platform: Platform, dry_run: bool, **flags: str | None
) -> None:
    """Install exod as a login service and start it.

    macOS: writes ~/Applications/exod.app and ~/Library/LaunchAgents/org.exod.daemon.plist and
    runs `launchctl bootstrap gui/UID`. Linux: writes ~/.config/systemd/user/exod.service and
    runs `systemctl --user enable --now`. exod's settings go with it: the EXOD_* variables of
    this shell and exod's own flags given here (a flag wins), checked as exod checks them (78
    if exod would refuse one), relative paths made absolute, EXOD_HOME always written out. An
    exod started by hand on the same home is refused (75): stop it first. Installing again
    replaces the files and restarts exod. Where no user service manager answers the files are
    written anyway and exoctl exits 69.

    \b
    Examples:
      exoctl service install --dry-run --platform macos
      exoctl service install --home /data/exod --idle-ttl 600
      EXOD_HOME=/data/exod exoctl service install
      .venv/bin/exoctl service install --from-source
    """
    require_this_platform(platform, dry_run)
    environment = checked_settings(platform, flags)
    refuse_if_held(settings.service_home(environment, platform))
    carry_out(install_plan(platform, from_source, environment), dry_run)


@service_group.command("uninstall")
@platform_option
@dry_run_option
def uninstall_command(*, platform: Platform, dry_run: bool) -> None:
    """Stop the service and remove everything `install` wrote (exod's state and log stay).

    An exod started by hand is left running. With nothing installed, says so and exits 0.

    \b
    Examples:
      exoctl service uninstall --dry-run
      exoctl service uninstall
    """
    require_this_platform(platform, dry_run)
    home, _ = settings.where_it_runs(platform, os.environ)  # before its files are gone
    plan = uninstall_plan(platform)
    there = present(plan.files)
    if not there:
        wanted = " nor ".join(str(step.path) for step in plan.files)
        say(f"exod is not installed as a service (there is no {wanted}): nothing to remove")
    else:
        carry_out(dataclasses.replace(plan, files=there), dry_run)
    found = holder.holder(home)
    if found is not None and not found.by_service and not dry_run:
        kill = f" (`kill {found.pid}` stops it)" if found.pid else ""
        say(
            f"{report.who(found)}, started by hand, still runs on {home}; uninstall leaves it{kill}"
        )


# --- status -------------------------------------------------------------------------------------


def exod_health(socket: Path) -> report.Health:
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


def restart_command(platform: Platform) -> plans.Command:
    return plans.macos_restart(os.getuid()) if platform == "macos" else plans.linux_restart()


def find(platform: Platform) -> report.Findings:
    """Everything `status` looks at: files, manager, socket, and who holds the home."""
    home, socket = settings.where_it_runs(platform, os.environ)
    why_not, state = manager_state(platform)
    found = holder.holder(home)
    if found and found.pid and state.pid and state.pid in (found.pid, _parent(found.pid)):
        found = dataclasses.replace(found, by_service=True)  # the manager says so, too
    return report.Findings(
        platform=platform,
        files={path: path.exists() for path in installed_files(platform)},
        manager_error=why_not,
        state=state,
        health=exod_health(socket),
        home=home,
        socket=socket,
        holder=found,
        restart=str(restart_command(platform)),
        local_network_denied=(
            platform == "macos" and localnet.in_log(log_tail(MacPaths.of(os.environ).log))
        ),
    )


def _parent(pid: int) -> int | None:
    """The parent of `pid` (launchd runs exod's launcher, whose child exod is)."""
    import psutil  # only `status` needs it

    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


@service_group.command("status")
@platform_option
@dry_run_option
@json_option
def status_command(*, platform: Platform, dry_run: bool, as_json: bool) -> None:
    """Whether the service is installed, what its manager says, and whether exod answers.

    Exits 0 when the service is up: its manager runs it and the exod answering on the socket
    is the service's. Else 69 with what to do, also when an exod started by hand answers.

    \b
    Examples:
      exoctl service status
      exoctl service status --json | jq .exod
    """
    require_this_platform(platform, dry_run)
    if dry_run:
        home, socket = settings.where_it_runs(platform, os.environ)
        probe = plans.macos_probe(os.getuid()) if platform == "macos" else plans.linux_probe()
        shown = plans.macos_status(os.getuid()) if platform == "macos" else plans.linux_status()
        print_lines(
            [
                *(f"check  {path} exists" for path in installed_files(platform)),
                f"run    {probe}",
                f"run    {shown}",
                f"check  grpc.health.v1.Health/Check on {socket}",
                f"check  which exod holds {home / holder.LOCK_NAME}",
            ]
        )
        return
    found = find(platform)
    if as_json:
        print_json(report.as_json(found))
    else:
        print_lines(report.lines(found))
    if found.local_network_denied:
        say(localnet.ADVICE)
    wrong = report.problem(found)
    if wrong is not None:
        raise Failure(Exit.UNAVAILABLE, one_line(*wrong))


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

    Exits 69 when there is no service log to show (no user service manager on Linux, no log
    file yet on macOS), saying where exod's log is instead.

    \b
    Examples:
      exoctl service logs -n 200
      exoctl service logs --follow
    """
    require_this_platform(platform, dry_run)
    if platform == "macos":
        log = MacPaths.of(os.environ).log
        command = plans.macos_logs(MacPaths.of(os.environ), lines, follow)
    else:
        command = plans.linux_logs(lines, follow)
    if dry_run:
        click.echo(f"run    {command}")
        return
    if platform == "macos" and not log.exists():
        raise Failure(
            Exit.UNAVAILABLE,
            one_line(
                f"there is no service log yet: launchd writes {log} once the service has run",
                "`exoctl service status` says whether it is installed; an exod started by "
                "hand logs to its own stderr",
            ),
        )
    if platform == "linux":
        why_not = apply.unreachable(plans.linux_probe())
        if why_not is not None:
            home, _ = settings.where_it_runs(platform, os.environ)
            wrong = report.logs_problem(why_not, home, holder.holder(home))
            raise Failure(Exit.UNAVAILABLE, one_line(*wrong))
    # Ctrl-C reaches the log reader too (same process group); for --follow it is the way to stop.
    on_ctrl_c = Ending(code=0, message=None) if follow else Ending()
    try:
        with interrupt.ending(on_ctrl_c):
            code = subprocess.call(command.argv, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise Failure(
            Exit.UNAVAILABLE,
            one_line(f"cannot show the log: {command.argv[0]} is not installed", ""),
        ) from None
    if code != 0:
        raise Failure(
            Exit.UNAVAILABLE,
            one_line(
                f"`{command}` exited {code}", "is the service installed? `exoctl service status`"
            ),
        )
