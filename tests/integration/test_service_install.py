"""`exoctl service` for real, on a private HOME: what it writes, where, and how it ends when no
service manager answers (as here: the tests point XDG_RUNTIME_DIR at an empty directory, so even
on a desktop with a user systemd nothing real is started, stopped or enabled)."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exod.service import plan, systemd
from exod.service.paths import LinuxPaths
from tests.daemon import Daemon

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
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
    assert "no user service manager answers (`systemctl --user show-environment`" in line
    assert "`systemctl --user enable --now exod.service`" in line
    service = plan.service_for(BIN / "exod", {}, None)
    assert unit.read_text() == systemd.unit([str(service.program)], {})

    removed = exoctl(env, "uninstall", "--platform", "linux")
    assert removed.returncode == 69, removed
    assert removed.stdout == f"removed {unit}\n"
    assert not unit.exists()


def test_install_carries_the_exod_settings_of_the_shell(tmp_path: Path) -> None:
    env = {**private_env(tmp_path), "EXOD_HOME": str(tmp_path / "data"), "EXOD_IDLE_TTL": "60"}
    assert exoctl(env, "install", "--platform", "linux").returncode == 69
    unit = LinuxPaths.of(env).unit.read_text()
    assert f'Environment="EXOD_HOME={tmp_path / "data"}"\n' in unit
    assert 'Environment="EXOD_IDLE_TTL=60"\n' in unit


# --- macOS, on any machine ------------------------------------------------------------------------


def test_macos_install_and_uninstall_on_a_private_home(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    home = tmp_path / "home"
    agent = home / "Library" / "LaunchAgents" / "org.exod.daemon.plist"
    app = home / "Applications" / "exod.app"

    installed = exoctl(env, "install", "--platform", "macos")
    if sys.platform != "darwin":
        assert installed.returncode == 69, installed
        assert "no user service manager answers (`launchctl print gui/" in installed.stderr
    launcher = Path(plistlib.loads(agent.read_bytes())["ProgramArguments"][0])
    assert launcher == app / "Contents" / "MacOS" / "exod-launcher"
    assert os.access(launcher, os.X_OK)
    assert plistlib.loads((app / "Contents" / "Info.plist").read_bytes())["NSBonjourServices"]
    assert (home / "Library" / "Logs" / "exod").is_dir()

    removed = exoctl(env, "uninstall", "--platform", "macos")
    assert removed.returncode == (0 if sys.platform == "darwin" else 69), removed
    assert not agent.exists()
    assert not app.exists()


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
    tmp_path: Path, platform: str, expected: list[str], command: str
) -> None:
    env = private_env(tmp_path)
    result = exoctl(env, command, "--dry-run", "--platform", platform)
    assert result.returncode == 0, result
    assert result.stdout
    if command == "install":
        for text in expected:
            assert text in result.stdout
    assert not (tmp_path / "home").exists()


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
    result = exoctl(private_env(tmp_path), "status", "--platform", "linux")
    assert result.returncode == 69, result
    assert "installed no:" in result.stdout
    assert "exod      unreachable on " in result.stdout
    (line,) = result.stderr.splitlines()
    assert "start it with `exoctl service install`" in line


def test_status_reports_a_running_exod_as_serving(tmp_path: Path, exod: Daemon) -> None:
    env = {**private_env(tmp_path), "EXOD_SOCKET": str(exod.socket)}
    result = exoctl(env, "status", "--platform", "linux", "--json")
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert report["exod"] == "serving"
    assert report["socket"] == str(exod.socket)
    assert report["installed"] is False
    assert report["manager"]["reachable"] is False
    assert report["local_network_denied"] is False
