"""`exoctl service` for real, on a private HOME: what it writes, where, what it refuses before
writing anything, and how it ends when no service manager answers (as here: the tests point
XDG_RUNTIME_DIR at an empty directory, so even on a desktop with a user systemd nothing real is
started, stopped or enabled)."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exod.service import plan, systemd
from exod.service.paths import LinuxPaths, MacPaths
from tests.daemon import short_dir, wait_until

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# Writing systemd's files is for Linux; on a Mac, `--platform linux` works only with --dry-run.
linux_only = pytest.mark.skipif(sys.platform == "darwin", reason="writes a systemd user unit")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed; `./dev test` installs it when run as root on "
    "Debian (apt-get install systemd)",
)


def private_env(tmp_path: Path) -> dict[str, str]:
    """A user with an empty HOME and no reachable user service manager."""
    drop = ("EXOD_", "XDG_", "DBUS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(runtime))
    return env


def exoctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exoctl", "service", *args],
        env=env,
        # Not the checkout: `python -m` puts the working directory first on the import path.
        cwd=Path(env["HOME"]).parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def state_dir(env: dict[str, str]) -> Path:
    """exod's default home on Linux for this private user."""
    return Path(env["HOME"]) / ".local" / "state" / "exod"


def unit_paths(env: dict[str, str]) -> list[Path]:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "--user", "unit-paths"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return [Path(line) for line in out.stdout.splitlines()]


def written_file(dry_run: str, path: Path) -> str:
    """The content that a --dry-run shows for `path`."""
    lines = dry_run.splitlines()
    start = lines.index(f"write  {path} (mode 644):") + 1
    body = []
    for line in lines[start:]:
        if not line.startswith("       "):
            break
        body.append(line[7:])
    return "\n".join(body) + "\n"


# --- Linux ----------------------------------------------------------------------------------------


@needs_systemd_analyze
def test_systemd_analyze_verify_finds_nothing_wrong_with_the_unit(tmp_path: Path) -> None:
    # Awkward paths on purpose: a space in the program's, `%` and a quote in a setting.
    odd_bin = tmp_path / "bin dir"
    odd_bin.mkdir()
    (odd_bin / "exod").symlink_to(BIN / "exod")
    service = plan.service_for(odd_bin / "exod", {"EXOD_HOME": str(tmp_path / '100% "x"')}, ROOT)
    unit = tmp_path / "exod.service"
    unit.write_text(systemd.unit([str(service.program)], service.environment))
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "--user", "verify", str(unit)],
        env=private_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    about_it = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "exod.service" in line or str(unit) in line
    ]
    assert about_it == []
    assert result.returncode == 0, result.stderr


@linux_only
@needs_systemd_analyze
def test_install_writes_the_unit_where_systemd_looks_and_uninstall_removes_it(
    tmp_path: Path,
) -> None:
    env = private_env(tmp_path)
    unit = LinuxPaths.of(env).unit
    assert unit.parent in unit_paths(env)

    installed = exoctl(env, "install", "--platform", "linux")
    # No user manager answers: the unit is written all the same, and exoctl says so with 69.
    assert installed.returncode == 69, installed
    assert installed.stdout == f"wrote {unit}\n"
    (line,) = installed.stderr.splitlines()
    assert line.startswith(
        "exoctl: wrote the service's files, but no user service manager answers "
        "(`systemctl --user show-environment`: "
    )
    assert line.endswith(
        "so exod was not started. where one runs, do: `systemctl --user daemon-reload`; "
        "`systemctl --user enable --now exod.service`; until then, run exod by hand: `exod`"
    )
    # The home is written out: the service keeps the state dir this shell's exoctl looks in.
    service = plan.service_for(BIN / "exod", {"EXOD_HOME": str(state_dir(env))}, None)
    assert unit.read_text() == systemd.unit([str(service.program)], service.environment)

    removed = exoctl(env, "uninstall", "--platform", "linux")
    assert removed.returncode == 69, removed
    assert removed.stdout == f"removed {unit}\n"
    (line,) = removed.stderr.splitlines()
    assert line.startswith(
        "exoctl: removed the service's files, but no user service manager answers "
        "(`systemctl --user show-environment`: "
    )
    assert line.endswith(
        "so nothing was stopped. where one runs, do: `systemctl --user daemon-reload`; "
        "`systemctl --user reset-failed exod.service`"
    )
    assert not unit.exists()


@linux_only
def test_install_carries_the_exod_settings_of_the_shell(tmp_path: Path) -> None:
    env = {**private_env(tmp_path), "EXOD_HOME": str(tmp_path / "data"), "EXOD_IDLE_TTL": "60"}
    assert exoctl(env, "install", "--platform", "linux").returncode == 69
    unit = LinuxPaths.of(env).unit.read_text()
    assert f'Environment="EXOD_HOME={tmp_path / "data"}"\n' in unit
    assert 'Environment="EXOD_IDLE_TTL=60"\n' in unit


@linux_only
def test_relative_paths_are_baked_in_absolute_and_the_service_runs_there(
    tmp_path: Path,
) -> None:
    # exoctl runs in tmp_path (see exoctl()); the service will run from / (or from HOME).
    env = {**private_env(tmp_path), "EXOD_HOME": "state", "EXOD_HTTP_PORT": "0"}
    assert exoctl(env, "install", "--platform", "linux").returncode == 69
    given = systemd.environment_of(LinuxPaths.of(env).unit.read_text())
    assert given == {"EXOD_HOME": str(tmp_path / "state"), "EXOD_HTTP_PORT": "0"}

    # What the unit runs, from where systemd or launchd runs it, with what the unit gives it.
    service_env = {"HOME": env["HOME"], "PATH": "/usr/bin:/bin", **given}
    proc = subprocess.Popen(
        [str(BIN / "exod")],
        env=service_env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        lock = tmp_path / "state" / "exod.lock"
        assert wait_until((tmp_path / "state" / "exod.sock").exists, 30.0), proc
        assert lock.read_text() == f"{proc.pid}\n"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("EXOD_KILL_GRACE", "-1"),
        ("EXOD_QUEUE_DEPTH", "many"),
        ("EXOD_HOME", ""),
        ("EXOD_HTTP_BIND", "0.0.0.0"),  # beyond loopback, and no key
    ],
)
def test_settings_exod_would_refuse_are_refused_before_anything_is_written(
    tmp_path: Path, setting: str, value: str, dry_run: bool
) -> None:
    env = {**private_env(tmp_path), setting: value}
    result = exoctl(env, "install", *(["--dry-run"] if dry_run else []))
    assert result.returncode == 78, result
    assert result.stdout == ""
    # exod's own words for the same settings, after its own prefix.
    exod = subprocess.run(
        [str(BIN / "exod")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert exod.returncode == 78, exod
    said = exod.stderr.strip().removeprefix("exod: ").rstrip(".")
    assert result.stderr == (
        f"exoctl: the service's exod would not start: {said}. nothing was installed; fix the "
        "setting (`exod --help` lists them), then run `exoctl service install` again\n"
    )
    assert not Path(env["HOME"]).exists()  # no unit, no plist, no directory, no state dir


def test_exods_flags_given_to_install_are_checked_and_baked_in(tmp_path: Path) -> None:
    env = {**private_env(tmp_path), "EXOD_IDLE_TTL": "5"}
    refused = exoctl(env, "install", "--home", "state", "--idle-ttl=-5")
    assert refused.returncode == 78, refused
    exod = subprocess.run(
        [str(BIN / "exod"), "--idle-ttl=-5"], env=env, capture_output=True, text=True, check=False
    )
    said = exod.stderr.strip().removeprefix("exod: ").rstrip(".")
    assert said.startswith("invalid --idle-ttl")  # the flag that was typed, as exod names it
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"exoctl: the service's exod would not start: {said}. ")
    assert not Path(env["HOME"]).exists()

    # A flag wins over the shell's variable, and a relative path is made absolute.
    shown = exoctl(env, "install", "--dry-run", "--home", "state", "--idle-ttl", "60")
    assert shown.returncode == 0, shown
    unit = written_file(shown.stdout, LinuxPaths.of(env).unit)
    assert systemd.environment_of(unit) == {
        "EXOD_HOME": str(tmp_path / "state"),  # exoctl ran in tmp_path
        "EXOD_IDLE_TTL": "60",
    }


def test_uninstall_with_nothing_installed_says_so_and_succeeds(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    result = exoctl(env, "uninstall")
    assert result.returncode == 0, result
    assert result.stdout == ""
    if sys.platform == "darwin":
        paths = MacPaths.of(env)
        missing = f"{paths.agent} nor {paths.bundle}"
    else:
        missing = str(LinuxPaths.of(env).unit)
    assert result.stderr == (
        f"exoctl: exod is not installed as a service (there is no {missing}): nothing to remove\n"
    )
    assert not Path(env["HOME"]).exists()


# --- macOS, on any machine ------------------------------------------------------------------------


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A HOME short enough for a socket in ~/Library/Application Support/exod (103 bytes)."""
    parent = short_dir()
    yield parent / "h"
    shutil.rmtree(parent)


def test_macos_dry_run_on_a_private_home_shows_the_bundle_and_the_agent(
    tmp_path: Path, short_home: Path
) -> None:
    env = {**private_env(tmp_path), "HOME": str(short_home)}
    paths = MacPaths.of(env)
    shown = exoctl(env, "install", "--dry-run", "--platform", "macos")
    assert shown.returncode == 0, shown
    agent = plistlib.loads(written_file(shown.stdout, paths.agent).encode())
    assert agent["ProgramArguments"] == [str(paths.launcher)]
    # macOS's own default home, written out, whatever machine rendered it.
    home = Path(env["HOME"]) / "Library" / "Application Support" / "exod"
    assert agent["EnvironmentVariables"]["EXOD_HOME"] == str(home)
    assert f"write  {paths.launcher} (mode 755):" in shown.stdout.splitlines()
    info_plist = written_file(shown.stdout, paths.bundle / "Contents" / "Info.plist")
    info = plistlib.loads(info_plist.encode())
    assert info["NSBonjourServices"]
    assert f"mkdir  {paths.log.parent}" in shown.stdout.splitlines()
    assert not short_home.exists()


# --- dry runs, anywhere ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        ("macos", [f"run    launchctl bootstrap gui/{os.getuid()} ", "exod-launcher (mode 755):"]),
        ("linux", ["run    systemctl --user enable --now exod.service", "Type=notify"]),
    ],
)
@pytest.mark.parametrize("command", ["install", "uninstall", "status", "logs"])
def test_dry_run_prints_and_changes_nothing(
    tmp_path: Path, short_home: Path, platform: str, expected: list[str], command: str
) -> None:
    env = {**private_env(tmp_path), "HOME": str(short_home)}
    result = exoctl(env, command, "--dry-run", "--platform", platform)
    assert result.returncode == 0, result
    if command == "uninstall":  # nothing is installed, so there is nothing it would remove
        assert result.stdout == ""
        assert result.stderr.startswith("exoctl: exod is not installed as a service")
    else:
        assert result.stdout
    if command == "install":
        for text in expected:
            assert text in result.stdout
    assert not short_home.exists()


def test_from_source_runs_the_checkouts_code_with_no_build_step(tmp_path: Path) -> None:
    # A checkout whose exod says another version, with no install of its own: what the unit
    # runs must print that version, so a change there shows at the next restart.
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("exod", "exoctl"):
        shutil.copytree(ROOT / package, checkout / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", checkout)
    init = checkout / "exod" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "9.9.9+dev"', init.read_text()))

    # The checkout's exoctl (the one on its import path), as a developer runs it.
    env = {**private_env(tmp_path), "PYTHONPATH": str(checkout)}
    shown = exoctl(env, "install", "--from-source", "--dry-run", "--platform", "linux")
    assert shown.returncode == 0, shown
    unit = written_file(shown.stdout, LinuxPaths.of(env).unit).splitlines()
    assert f'Environment="PYTHONPATH={checkout}"' in unit

    # Run what the unit runs, with the environment the unit gives it and no other.
    (program,) = [line.removeprefix("ExecStart=") for line in unit if "ExecStart=" in line]
    given = dict(
        line.removeprefix('Environment="').removesuffix('"').split("=", 1)
        for line in unit
        if line.startswith("Environment=")
    )
    service_env = {**private_env(tmp_path), **given}
    ran = subprocess.run(
        [program, "--version"], env=service_env, capture_output=True, text=True, check=False
    )
    assert ran.stdout == "exod 9.9.9+dev\n", ran


def test_from_source_outside_a_checkout_is_a_usage_error(tmp_path: Path) -> None:
    # A copy of the packages without pyproject.toml: an installed exod, not a checkout.
    site = tmp_path / "site"
    for package in ("exod", "exoctl"):
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__py*"))
    env = {**private_env(tmp_path), "PYTHONPATH": str(site)}
    result = exoctl(env, "install", "--from-source", "--dry-run")
    assert result.returncode == 64, result
    assert "--from-source needs exoctl to run from a source checkout" in result.stderr


# --- status ---------------------------------------------------------------------------------------


def test_status_says_how_to_start_exod_when_nothing_runs(tmp_path: Path) -> None:
    result = exoctl(private_env(tmp_path), "status")
    assert result.returncode == 69, result
    assert "installed no:" in result.stdout
    assert "exod      unreachable on " in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith("exoctl: exod is not running and is not installed as a service")
    assert line.endswith("(`exod`, in the foreground); for a service, see docs/install.md")


@linux_only
def test_status_of_an_installed_service_with_no_manager_is_69(tmp_path: Path) -> None:
    env = {**private_env(tmp_path), "EXOD_HOME": str(tmp_path / "data")}
    assert exoctl(env, "install").returncode == 69
    # A shell without the setting: status still looks where the installed service runs.
    del env["EXOD_HOME"]
    result = exoctl(env, "status", "--json")
    assert result.returncode == 69, result
    report = json.loads(result.stdout)
    assert report["installed"] is True
    assert report["home"] == str(tmp_path / "data")
    assert report["socket"] == str(tmp_path / "data" / "exod.sock")
    assert report["manager"]["reachable"] is False
    assert (report["exod"], report["exod_pid"], report["started_by"]) == ("unreachable", None, None)
    (line,) = result.stderr.splitlines()
    assert line.startswith("exoctl: the service is installed, but no user service manager answers")
    assert line.endswith(
        "so exod is not running. run exod by hand (`exod`), or see docs/install.md"
    )


@linux_only
def test_logs_with_no_manager_exit_69_and_say_where_the_log_is(tmp_path: Path) -> None:
    env = {**private_env(tmp_path), "EXOD_HOME": str(tmp_path / "data")}
    result = exoctl(env, "logs")
    assert result.returncode == 69, result
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("exoctl: no user service manager answers (")
    assert line.endswith(
        "so there is no service log. an exod started by hand logs to its own stderr; its "
        f"runners log to {tmp_path / 'data' / 'runners'}"
    )
    assert not (tmp_path / "data").exists()
