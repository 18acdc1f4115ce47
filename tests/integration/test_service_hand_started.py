"""`exoctl service` beside an exod started by hand, for real: install refuses to put a service
on a home that exod holds (the service's exod would exit 75 at every start), and status, logs
and uninstall say what is true about it, with its pid. An exod that the service's launcher
started is the service's, and is not refused.

As in test_service_install.py, no user service manager answers here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from exod.service import launchd
from exod.service.paths import LinuxPaths
from tests.daemon import Daemon, wait_until
from tests.integration.test_service_install import BIN, exoctl, private_env


def service_env(tmp_path: Path, d: Daemon) -> dict[str, str]:
    """A private user (HOME apart from `d`'s) whose shell points at `d`'s home and socket."""
    user = tmp_path / "user"
    user.mkdir(exist_ok=True)
    return {**private_env(user), "EXOD_HOME": str(d.home), "EXOD_SOCKET": str(d.socket)}


def test_install_refuses_a_home_that_an_exod_started_by_hand_holds(
    tmp_path: Path, exod: Daemon
) -> None:
    env = service_env(tmp_path, exod)
    for dry_run in ([], ["--dry-run"]):
        result = exoctl(env, "install", *dry_run)
        assert result.returncode == 75, result
        assert result.stdout == ""
        assert result.stderr == (
            f"exoctl: exod (pid {exod.pid}) is already running on {exod.home}, started by hand, "
            "so the service's exod could not take that home. nothing was installed; stop it "
            f"(`kill {exod.pid}`) and run `exoctl service install` again, or give the service "
            "another home (`exoctl service install --home DIR`)\n"
        )
    assert not Path(env["HOME"]).exists()  # no unit, no directory
    assert exod.alive()

    # Once it is stopped, the same install goes ahead (and ends 69: no manager answers here).
    assert exod.stop() == 0
    installed = exoctl(env, "install")
    assert installed.returncode == 69, installed
    assert LinuxPaths.of(env).unit.is_file()


def test_status_does_not_take_an_exod_started_by_hand_for_the_service(
    tmp_path: Path, exod: Daemon
) -> None:
    env = service_env(tmp_path, exod)
    result = exoctl(env, "status", "--json")
    assert result.returncode == 69, result
    report = json.loads(result.stdout)
    assert report["exod"] == "serving"
    assert (report["exod_pid"], report["started_by"]) == (exod.pid, "hand")
    assert (report["home"], report["socket"]) == (str(exod.home), str(exod.socket))
    assert report["installed"] is False
    assert report["manager"]["reachable"] is False
    (line,) = result.stderr.splitlines()
    assert line.startswith("exoctl: no user service manager answers (")
    assert line.endswith(
        f"so exod does not run as a service; exod (pid {exod.pid}) on {exod.home} was started "
        "by hand. it serves exoctl as it is, but nothing restarts it; for a service, install "
        "where a user service manager runs (docs/install.md)"
    )

    text = exoctl(env, "status")
    assert text.returncode == 69, text
    assert (
        f"exod      serving on {exod.socket}, pid {exod.pid}, started by hand"
        in text.stdout.splitlines()
    )


def test_logs_point_at_the_hand_started_exods_own_stderr(tmp_path: Path, exod: Daemon) -> None:
    result = exoctl(service_env(tmp_path, exod), "logs")
    assert result.returncode == 69, result
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.endswith(
        f"so there is no service log. exod (pid {exod.pid}) was started by hand and logs to "
        f"its own stderr; its runners log to {exod.home / 'runners'}"
    )


def test_uninstall_leaves_an_exod_started_by_hand_running_and_says_so(
    tmp_path: Path, exod: Daemon
) -> None:
    env = service_env(tmp_path, exod)
    result = exoctl(env, "uninstall")
    assert result.returncode == 0, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "exoctl: exod is not installed as a service (there is no "
        f"{LinuxPaths.of(env).unit}): nothing to remove",
        f"exoctl: exod (pid {exod.pid}), started by hand, still runs on {exod.home}; uninstall "
        f"leaves it (`kill {exod.pid}` stops it)",
    ]
    assert exod.alive()


def test_an_exod_that_the_services_launcher_started_is_not_refused(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    # exod.app's launcher, as launchd starts it: exod is its child, which is how exoctl tells
    # the service's exod from one started by hand (on Linux, by exod.service's cgroup).
    launcher = tmp_path / "exod.app" / "Contents" / "MacOS" / "exod-launcher"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(launchd.launcher_script())
    launcher.chmod(0o755)
    d = Daemon.create(tmp_path / "exod-home")
    daemon_factory.append(d)
    proc = subprocess.Popen(
        [str(launcher)],
        env={**d.base_env(), "PATH": f"{BIN}:{launchd.SYSTEM_PATH}"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_until(lambda: d.socket.exists() or proc.poll() is not None, 30.0)
        env = service_env(tmp_path, d)
        shown = exoctl(env, "install", "--dry-run")
        assert shown.returncode == 0, shown
        status = exoctl(env, "status", "--json")
        assert json.loads(status.stdout)["started_by"] == "service", status
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher forwards it; exod drains
        proc.wait(timeout=30)
    assert proc.returncode == 0
