"""What `exoctl service install` checks before it writes anything: the settings, baked as exod
would read them in the installing shell, and which exod holds the home; and how `status` reads
the settings back from the installed unit."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from exod import config
from exod.service import settings, systemd
from exod.service.holder import Holder, holder, in_unit_cgroup, is_launcher
from exod.service.paths import Platform

# --- the settings the service carries -------------------------------------------------------------


def test_relative_paths_are_made_absolute_in_the_installing_shells_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {
        "HOME": "/home/ada",
        "EXOD_HOME": "state",
        "EXOD_SOCKET": "./run/exod.sock",
        "EXOD_API_KEY_FILE": "key",
        "EXOD_IDLE_TTL": "60",
        "PATH": "/bin",
    }
    assert settings.baked_environment(environ, "linux") == {
        "EXOD_API_KEY_FILE": str(tmp_path / "key"),
        "EXOD_HOME": str(tmp_path / "state"),
        "EXOD_IDLE_TTL": "60",  # not a path: as given
        "EXOD_SOCKET": str(tmp_path / "run" / "exod.sock"),
    }


def test_flags_win_over_the_shells_variables_and_are_baked_in_as_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {"HOME": "/home/ada", "EXOD_IDLE_TTL": "5", "EXOD_LOG_LEVEL": "debug"}
    flags = {"home": "state", "idle_ttl": "60", "queue_depth": None}
    assert settings.baked_environment(environ, "linux", flags) == {
        "EXOD_HOME": str(tmp_path / "state"),
        "EXOD_IDLE_TTL": "60",
        "EXOD_LOG_LEVEL": "debug",
    }
    with pytest.raises(config.ConfigError, match="--idle-ttl"):
        settings.baked_environment(environ, "linux", {"idle_ttl": "-5"})


def test_a_tilde_is_the_installing_users_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/ada")
    baked = settings.baked_environment({"HOME": "/home/ada", "EXOD_HOME": "~/exod"}, "linux")
    assert baked == {"EXOD_HOME": "/home/ada/exod"}


@pytest.mark.parametrize(
    ("platform", "home"),
    [
        ("linux", "/home/ada/.local/state/exod"),
        ("macos", "/home/ada/Library/Application Support/exod"),
    ],
)
def test_the_home_is_always_written_out_for_the_platform(platform: Platform, home: str) -> None:
    assert settings.baked_environment({"HOME": "/home/ada"}, platform) == {"EXOD_HOME": home}


def test_xdg_state_home_of_the_shell_is_kept_even_where_the_service_lacks_it() -> None:
    environ = {"HOME": "/home/ada", "XDG_STATE_HOME": "/state"}
    assert settings.baked_environment(environ, "linux") == {"EXOD_HOME": "/state/exod"}


@pytest.mark.parametrize(
    "environ",
    [
        {"EXOD_KILL_GRACE": "-1"},
        {"EXOD_HOME": ""},
        {"EXOD_HTTP_BIND": "0.0.0.0"},  # beyond loopback without a key
        {"EXOD_HOME": "/" + "a" * 100},  # its socket would be too long
    ],
)
def test_what_exod_would_refuse_is_refused_with_exods_own_words(
    environ: dict[str, str],
) -> None:
    full = {"HOME": "/home/ada", **environ}
    with pytest.raises(config.ConfigError) as refused:
        settings.baked_environment(full, "linux")
    with pytest.raises(config.ConfigError) as exods:
        config.load({}, full)
    assert str(refused.value) == str(exods.value)


def test_the_unit_gives_back_what_was_baked_in_whatever_the_characters() -> None:
    environment = {"EXOD_HOME": '/d/100% "x" \\ $HOME', "EXOD_RUNNER_WRAPPER": "nice -n 10"}
    text = systemd.unit(["/opt/exod/bin/exod"], environment)
    assert systemd.environment_of(text) == environment


def test_status_looks_where_the_installed_service_runs(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path)}
    assert settings.where_it_runs("linux", environ) == (
        tmp_path / ".local" / "state" / "exod",
        tmp_path / ".local" / "state" / "exod" / "exod.sock",
    )
    unit = tmp_path / ".config" / "systemd" / "user" / "exod.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(systemd.unit(["exod"], {"EXOD_HOME": "/data/exod"}))
    assert settings.where_it_runs("linux", environ) == (
        Path("/data/exod"),
        Path("/data/exod/exod.sock"),
    )


# --- who holds the home ---------------------------------------------------------------------------


def test_no_lock_file_means_no_holder_and_nothing_is_created(tmp_path: Path) -> None:
    assert holder(tmp_path / "home") is None
    assert not (tmp_path / "home").exists()


def test_a_lock_that_nobody_holds_is_no_holder(tmp_path: Path) -> None:
    (tmp_path / "exod.lock").write_text("99999\n")  # left by an exod that has exited
    assert holder(tmp_path) is None


def test_the_holder_is_named_by_the_pid_in_its_lock(tmp_path: Path) -> None:
    with (tmp_path / "exod.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as exod/daemon.py hold_home does
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        assert holder(tmp_path) == Holder(pid=os.getpid(), by_service=False)
        lock.truncate(0)  # the instant before exod writes its pid
        assert holder(tmp_path) == Holder(pid=None, by_service=False)


@pytest.mark.parametrize(
    ("text", "ours"),
    [
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/exod.service\n", True),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/exod.service/exod\n", True),
        ("1:name=systemd:/user.slice/user@1000.service/exod.service\n0::/\n", True),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", False),
        ("0::/user.slice/user@1000.service/app.slice/notexod.service\n", False),
        ("0::/\n", False),
    ],
)
def test_the_units_cgroup_marks_the_services_exod(text: str, ours: bool) -> None:
    assert in_unit_cgroup(text) is ours


def test_the_launchers_child_is_the_services_exod() -> None:
    assert is_launcher(["/bin/sh", "/Users/ada/Applications/exod.app/Contents/MacOS/exod-launcher"])
    assert not is_launcher(["-zsh"])
    assert not is_launcher(["/bin/sh", "-c", "exod-launcher-like"])
