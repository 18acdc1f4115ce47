"""The macOS service, built and run here: packaging/macos/build-app assembles exod.app and its
agent (the same as exoctl renders), and the bundle's launcher runs the real exod as its child,
forwarding signals. Only launchd itself needs a Mac (docs/macos-checklist.md)."""

from __future__ import annotations

import os
import plistlib
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from exod import __version__
from exod.service import launchd
from tests.daemon import Daemon, short_dir, wait_until

ROOT = Path(__file__).resolve().parents[2]
BUILD_APP = ROOT / "packaging" / "macos" / "build-app"
BIN = Path(sys.executable).parent  # holds the exod that this test's python runs


def build_app(out: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUILD_APP), str(out), str(BIN / "exod")],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_build_app_writes_the_bundle_and_the_agent_that_exoctl_would(tmp_path: Path) -> None:
    out = tmp_path / "out"
    built = build_app(out, tmp_path / "home")
    assert built.returncode == 0, built.stderr
    app = out / "exod.app"

    info = plistlib.loads((app / "Contents" / "Info.plist").read_bytes())
    assert info == launchd.info_plist(__version__)
    assert info["NSBonjourServices"] == ["_exod._tcp"]
    assert info["NSLocalNetworkUsageDescription"]

    agent = plistlib.loads((out / "org.exod.daemon.plist").read_bytes())
    launcher = app / "Contents" / "MacOS" / "exod-launcher"
    log = tmp_path / "home" / "Library" / "Logs" / "exod" / "exod.log"
    environment = {"PATH": f"{BIN}:{launchd.SYSTEM_PATH}"}
    assert agent == launchd.agent_plist(str(launcher), str(log), environment)
    program = Path(agent["ProgramArguments"][0])
    assert program.is_file()
    assert os.access(program, os.X_OK)
    assert program.read_text() == launchd.launcher_script()


def start_launcher(
    launcher: Path, d: Daemon, *args: str, path: str | None = None
) -> subprocess.Popen[bytes]:
    """The launcher as launchd would start it: exod on PATH, the agent's environment."""
    env = {**d.base_env(), "PATH": path or f"{BIN}:{launchd.SYSTEM_PATH}"}
    return subprocess.Popen(
        [str(launcher), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own group, exod's too: cleanup can end both at once
    )


def test_the_launcher_stays_exods_parent_and_forwards_sigterm(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    assert build_app(tmp_path / "out", tmp_path / "home").returncode == 0
    launcher = tmp_path / "out" / "exod.app" / "Contents" / "MacOS" / "exod-launcher"
    d = Daemon.create(tmp_path / "exod-home")
    daemon_factory.append(d)
    # exod gets the launcher's arguments: here, a socket that only these arguments name.
    sock = short_dir() / "given.sock"
    proc = start_launcher(launcher, d, "--socket", str(sock), "--log-level", "debug")
    child = None
    try:
        assert wait_until(lambda: sock.exists() or proc.poll() is not None, 30.0)
        assert proc.poll() is None, proc.communicate()
        (child,) = psutil.Process(proc.pid).children()
        assert child.cmdline()[-4:] == ["--socket", str(sock), "--log-level", "debug"]
        # Not exec'd: the launcher is still the bundle's shell script, and exod its child.
        assert child.ppid() == proc.pid
        assert str(launcher) in psutil.Process(proc.pid).cmdline()

        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None or (child is not None and child.is_running()):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # exod drained and exited 0 (it removes its socket only then), and the launcher with it.
    assert proc.returncode == 0, err
    assert not child.is_running()
    assert not sock.exists()
    assert b"stopped" in err
    sock.parent.rmdir()


def test_the_launcher_passes_exods_exit_status_on(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    assert build_app(tmp_path / "out", tmp_path / "home").returncode == 0
    launcher = tmp_path / "out" / "exod.app" / "Contents" / "MacOS" / "exod-launcher"
    d = Daemon.create(tmp_path / "exod-home")
    daemon_factory.append(d)
    d.start()
    second = start_launcher(launcher, d)  # the same home: exod refuses with 75
    _, err = second.communicate(timeout=60)
    assert second.returncode == 75, err
    assert b"another exod" in err


def test_a_configuration_error_is_not_restarted(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    assert build_app(tmp_path / "out", tmp_path / "home").returncode == 0
    launcher = tmp_path / "out" / "exod.app" / "Contents" / "MacOS" / "exod-launcher"
    d = Daemon.create(tmp_path / "exod-home", EXOD_IDLE_TTL="-1")
    daemon_factory.append(d)
    # exod exits 78; the launcher leaves 0 so that KeepAlive (SuccessfulExit=false) does not
    # restart it every ThrottleInterval, and says why in the log.
    bad = start_launcher(launcher, d)
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 0, err
    first, second = err.decode().splitlines()
    assert first.startswith("exod: invalid EXOD_IDLE_TTL")
    assert "not restarting" in second
    # No exod on PATH at all: the same, with the PATH it searched.
    lost = start_launcher(launcher, d, path="/nonexistent")
    _, err = lost.communicate(timeout=60)
    assert lost.returncode == 0, err
    assert b"no exod on PATH (/nonexistent)" in err
