"""What `exoctl service` does, as data (pure): the files to write or remove and the commands to
run, per platform. `--dry-run` prints a plan; otherwise exoctl carries it out (apply.py).

A plan's commands talk to the user's service manager (launchd's gui domain, `systemctl --user`).
When that manager cannot be reached (no login session, no user systemd, another OS) the files
are still written or removed and the commands are reported instead of run.

exoctl makes an install plan only for a service that can start: it checks the settings first
(settings.py), and that no exod started by hand holds the home they name (holder.py).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from exod.service import launchd, systemd
from exod.service.paths import LABEL, UNIT, LinuxPaths, MacPaths, Platform


@dataclass(frozen=True)
class Service:
    """What the service runs: an exod executable and the environment it gets."""

    program: Path
    environment: dict[str, str] = field(default_factory=dict)


def carried_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The exod settings (EXOD_*) of the shell that installs the service, which the service
    keeps: `EXOD_HOME=/data/exod exoctl service install` means what it says."""
    return {k: environ[k] for k in sorted(environ) if k.startswith("EXOD_")}


def service_for(program: Path, environ: Mapping[str, str], source: Path | None) -> Service:
    """The service for `program`; with `source`, one that imports exod from that checkout, so a
    change there takes effect when the service restarts, with no build or install step."""
    environment = carried_environment(environ)
    if source is not None:
        environment["PYTHONPATH"] = str(source)
    return Service(program, environment)


@dataclass(frozen=True)
class Write:
    path: Path
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class MakeDir:
    path: Path


@dataclass(frozen=True)
class Remove:
    path: Path  # a file, or a directory with everything in it


FileStep = Write | MakeDir | Remove


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    # True for the steps that fail harmlessly: stopping a service that is not loaded.
    may_fail: bool = False

    def __str__(self) -> str:
        return shlex.join(self.argv)


Action = Literal["install", "uninstall"]


@dataclass(frozen=True)
class Plan:
    platform: Platform
    action: Action
    probe: Command  # succeeds when the user's service manager answers
    before: tuple[Command, ...] = ()  # run before the files change (stop the old service)
    files: tuple[FileStep, ...] = ()
    after: tuple[Command, ...] = ()  # run once they have (start the new one)
    notes: tuple[str, ...] = ()


def _state_note(service: Service) -> tuple[str, ...]:
    home = service.environment.get("EXOD_HOME")
    return (f"its state dir: {home}",) if home else ()


# --- macOS ----------------------------------------------------------------------------------------


def _gui(uid: int) -> str:
    return f"gui/{uid}"


def macos_probe(uid: int) -> Command:
    return Command(("launchctl", "print", _gui(uid)))


def macos_install(paths: MacPaths, service: Service, version: str, uid: int) -> Plan:
    environment = {
        # The launcher runs the `exod` it finds first on PATH: this one.
        "PATH": f"{service.program.parent}:{launchd.SYSTEM_PATH}",
        **service.environment,
    }
    agent = launchd.agent_plist(str(paths.launcher), str(paths.log), environment)
    bundle = tuple(
        Write(paths.bundle / name, content, mode)
        for name, (content, mode) in launchd.bundle_files(version).items()
    )
    job = f"{_gui(uid)}/{LABEL}"
    return Plan(
        platform="macos",
        action="install",
        probe=macos_probe(uid),
        before=(Command(("launchctl", "bootout", job), may_fail=True),),
        files=(*bundle, MakeDir(paths.log.parent), Write(paths.agent, launchd.dumps(agent))),
        after=(
            Command(("launchctl", "enable", job)),
            Command(("launchctl", "bootstrap", _gui(uid), str(paths.agent))),
        ),
        notes=(
            "exod runs now and starts at every login; launchd restarts it if it fails.",
            f"its log: {paths.log} (`exoctl service logs`).",
            *_state_note(service),
            "the first time exod looks for peers, macOS asks whether it may find devices on "
            "the local network: answer Allow (docs/troubleshooting.md).",
        ),
    )


def macos_uninstall(paths: MacPaths, uid: int) -> Plan:
    return Plan(
        platform="macos",
        action="uninstall",
        probe=macos_probe(uid),
        before=(Command(("launchctl", "bootout", f"{_gui(uid)}/{LABEL}"), may_fail=True),),
        files=(Remove(paths.agent), Remove(paths.bundle)),
        notes=(f"exod's log is kept: {paths.log}; its state dir too.",),
    )


def macos_status(uid: int) -> Command:
    return Command(("launchctl", "print", f"{_gui(uid)}/{LABEL}"))


def macos_restart(uid: int) -> Command:
    return Command(("launchctl", "kickstart", "-k", f"{_gui(uid)}/{LABEL}"))


def macos_logs(paths: MacPaths, lines: int, follow: bool) -> Command:
    return Command(("tail", "-n", str(lines), *(["-F"] if follow else []), str(paths.log)))


# --- Linux ----------------------------------------------------------------------------------------

LINGER = (
    "exod starts when you log in and stops when your last session ends; to start it at boot "
    "and keep it running while you are logged out, run `loginctl enable-linger $USER` once "
    "(it may ask for your password)."
)


def _systemctl(*args: str, may_fail: bool = False) -> Command:
    return Command(("systemctl", "--user", *args), may_fail=may_fail)


def linux_probe() -> Command:
    return _systemctl("show-environment")


def linux_install(paths: LinuxPaths, service: Service) -> Plan:
    text = systemd.unit([str(service.program)], service.environment)
    return Plan(
        platform="linux",
        action="install",
        probe=linux_probe(),
        before=(_systemctl("stop", UNIT, may_fail=True),),
        files=(Write(paths.unit, text.encode()),),
        after=(_systemctl("daemon-reload"), _systemctl("enable", "--now", UNIT)),
        notes=(
            "systemd restarts exod if it fails or stops answering.",
            "its log: the user journal (`exoctl service logs`).",
            *_state_note(service),
            LINGER,
        ),
    )


def linux_uninstall(paths: LinuxPaths) -> Plan:
    return Plan(
        platform="linux",
        action="uninstall",
        probe=linux_probe(),
        before=(_systemctl("disable", "--now", UNIT, may_fail=True),),
        files=(Remove(paths.unit),),
        after=(_systemctl("daemon-reload"), _systemctl("reset-failed", UNIT, may_fail=True)),
        notes=("exod's state dir is kept.",),
    )


STATUS_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "ExecMainStatus")


def linux_status() -> Command:
    return _systemctl("show", UNIT, "--property=" + ",".join(STATUS_PROPERTIES))


def linux_restart() -> Command:
    return _systemctl("restart", UNIT)


def linux_logs(lines: int, follow: bool) -> Command:
    argv = ["journalctl", "--user", "--unit", UNIT, "--lines", str(lines), "--no-pager"]
    return Command((*argv, *(["--follow"] if follow else [])))


# --- showing a plan -------------------------------------------------------------------------------


def describe(plan: Plan) -> list[str]:
    """The plan as `--dry-run` prints it, in the order it is carried out: each file with its
    content, each command as one would type it."""
    lines = [f"check  {plan.probe}   (the service manager answers? if not, only files change)"]
    lines += [_run_line(c) for c in plan.before]
    for step in plan.files:
        if isinstance(step, Write):
            lines.append(f"write  {step.path} (mode {step.mode:o}):")
            lines += ["       " + line for line in step.content.decode().splitlines()]
        elif isinstance(step, MakeDir):
            lines.append(f"mkdir  {step.path}")
        else:
            lines.append(f"remove {step.path}")
    lines += [_run_line(c) for c in plan.after]
    return lines


def _run_line(command: Command) -> str:
    return f"run    {command}" + (
        "   (fails harmlessly when nothing runs)" if command.may_fail else ""
    )
