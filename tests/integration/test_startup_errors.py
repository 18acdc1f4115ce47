"""Every way the real exod can fail to start: one line on stderr, the documented exit code (78
for what only a person can fix, so that no service manager restart-loops on it), no traceback,
and nothing of the user's touched. See docs/troubleshooting.md, "exod will not start"."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exod import config
from tests.daemon import short_dir

USER = config.user_name()


def run_exod(
    home: Path,
    socket: Path,
    *args: str,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "exod", *args],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(home.parent),
            "EXOD_HOME": str(home),
            "EXOD_SOCKET": str(socket),
            "EXOD_HTTP_PORT": "0",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def refused_line(result: subprocess.CompletedProcess[str], code: int = 78) -> str:
    """The one line exod said, after checking that it exited `code` and said nothing else."""
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("exod: "), line
    return line


@pytest.fixture
def sock() -> Iterator[Path]:
    path = short_dir() / "exod.sock"
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


# ---- the home ----


def test_a_home_under_a_file_is_refused(tmp_path: Path, sock: Path) -> None:
    (tmp_path / "afile").write_text("mine")
    home = tmp_path / "afile" / "home"
    line = refused_line(run_exod(home, sock))
    assert line == (
        f"exod: cannot create its home {home}: {tmp_path / 'afile'} is a file, not a directory; "
        f"set EXOD_HOME or --home to a directory that {USER} can write"
    )
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_home_that_is_a_file_is_refused(tmp_path: Path, sock: Path) -> None:
    home = tmp_path / "home"
    home.write_text("mine")
    line = refused_line(run_exod(home, sock, "--home", str(home)))
    assert f"cannot create its home {home}: {home} is a file, not a directory" in line
    assert home.read_text() == "mine"


def _without_dac_override() -> tuple[str, ...]:
    """A command prefix that runs root without the capability to ignore file permissions, so
    that a directory of another user really refuses a write (tests run as root); skips the test
    where that cannot be had."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search")
    probe = subprocess.run([*prefix, "true"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr!r}")
    return prefix


def _others_dir(path: Path) -> Path:
    """A directory owned by nobody (65534), mode 0755: not root's to write without the cap."""
    path.mkdir()
    os.chown(path, 65534, 65534)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("inside", [True, False], ids=["home-inside", "home-is-it"])
def test_a_home_this_user_may_not_write_is_refused(
    tmp_path: Path, sock: Path, inside: bool
) -> None:
    prefix = _without_dac_override()
    theirs = _others_dir(tmp_path / "theirs")
    home = theirs / "home" if inside else theirs
    line = refused_line(run_exod(home, sock, prefix=prefix))
    doing = "create its home" if inside else "write in its home"
    assert line == (
        f"exod: cannot {doing} {home}: user {USER} may not write to {theirs}; "
        f"set EXOD_HOME or --home to a directory that {USER} can write"
    )
    assert list(theirs.iterdir()) == []


def _read_only_mount(ro: Path) -> tuple[str, ...]:
    """A prefix that runs the command after it with a read-only tmpfs on `ro`, in a mount
    namespace of its own (read-only holds for root too); skips where that is not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare")
    ro.mkdir()
    prefix = (unshare, "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {ro} && exec "$0" "$@"')
    probe = subprocess.run([*prefix, "true"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a new namespace here: {probe.stderr!r}")
    return prefix


def test_a_home_on_a_read_only_file_system_is_refused(tmp_path: Path, sock: Path) -> None:
    prefix = _read_only_mount(tmp_path / "ro")
    home = tmp_path / "ro" / "home"
    line = refused_line(run_exod(home, sock, prefix=prefix))
    assert line == (
        f"exod: cannot create its home {home}: {tmp_path / 'ro'} is on a read-only file "
        f"system; set EXOD_HOME or --home to a directory that {USER} can write"
    )


def test_a_lock_file_that_is_a_directory_is_refused(tmp_path: Path, sock: Path) -> None:
    home = tmp_path / "home"
    (home / "exod.lock").mkdir(parents=True)
    line = refused_line(run_exod(home, sock))
    assert line == (
        f"exod: cannot write in its home {home}: {home / 'exod.lock'} is a directory; "
        "move it aside, or set EXOD_HOME or --home to another directory"
    )


@pytest.mark.parametrize(("name", "content"), [("secret", b"not hex\n"), ("node_id", b"")])
def test_a_damaged_identity_file_is_refused(
    tmp_path: Path, sock: Path, name: str, content: bytes
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / name).write_bytes(content)
    line = refused_line(run_exod(home, sock))
    assert line == (
        f"exod: {home / name} is damaged (it is not what exod wrote there); restore it from a "
        "backup, or move it aside and exod makes a new one"
    )
    assert (home / name).read_bytes() == content
    assert not (home / "exod.db").exists()


# ---- the event log ----


def test_a_database_of_garbage_is_refused_with_78(tmp_path: Path, sock: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    garbage = b"this is not an SQLite database " * 200
    (home / "exod.db").write_bytes(garbage)
    line = refused_line(run_exod(home, sock))
    assert line == (
        f"exod: the event log {home / 'exod.db'} is damaged (file is not a database); with exod "
        "stopped, restore the file from a backup, or move it aside to start with an empty log"
    )
    assert (home / "exod.db").read_bytes() == garbage
    assert not sock.exists()


def test_a_directory_in_place_of_the_database_is_refused(tmp_path: Path, sock: Path) -> None:
    home = tmp_path / "home"
    (home / "exod.db").mkdir(parents=True)
    line = refused_line(run_exod(home, sock))
    assert line == (
        f"exod: cannot open the event log {home / 'exod.db'}: it is a directory, not a database "
        "file; move it aside to start with an empty log"
    )


@pytest.mark.parametrize("mode", [0o600, 0o644], ids=["unreadable", "read-only"])
def test_a_database_this_user_may_not_write_is_refused(
    tmp_path: Path, sock: Path, mode: int
) -> None:
    prefix = _without_dac_override()
    home = tmp_path / "home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)  # the home is writable: only the log is not
    db = home / "exod.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    os.chown(db, 65534, 65534)
    db.chmod(mode)
    line = refused_line(run_exod(home, sock, prefix=prefix))
    assert line == (
        f"exod: cannot open the event log {db}: user {USER} may not read and write it; give it "
        f"back to {USER} (chown), or move it aside to start with an empty log"
    )


# ---- the socket ----


def test_a_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / ("s" * 120)
    line = refused_line(run_exod(tmp_path / "home", sock))
    assert line.startswith(f"exod: socket path {sock} is {len(os.fsencode(sock))} bytes, ")
    assert line.endswith("set EXOD_SOCKET or --socket to a shorter path")
    assert not (tmp_path / "home").exists()


def test_a_socket_directory_under_a_file_is_refused(tmp_path: Path, sock: Path) -> None:
    afile = sock.parent / "afile"
    afile.write_text("mine")
    line = refused_line(run_exod(tmp_path / "home", afile / "exod.sock"))
    assert line == (
        f"exod: cannot listen on {afile / 'exod.sock'}: {afile} is a file, not a directory; "
        f"set EXOD_SOCKET or --socket to a path in a directory that {USER} can write"
    )
    assert not (tmp_path / "home" / "exod.db").exists()  # refused before the log is opened


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_socket_path_taken_by_a_file_or_directory_is_refused_and_kept(
    tmp_path: Path, sock: Path, kind: str
) -> None:
    if kind == "file":
        sock.write_text("mine")
    else:
        sock.mkdir()
    line = refused_line(run_exod(tmp_path / "home", sock))
    assert line == (
        f"exod: cannot listen on {sock}: it is a {kind}, not a socket; move it aside, or set "
        "EXOD_SOCKET or --socket to another path"
    )
    assert sock.read_text() == "mine" if kind == "file" else sock.is_dir()
    assert not (tmp_path / "home" / "exod.db").exists()


def test_a_socket_in_a_directory_this_user_may_not_write_is_refused(
    tmp_path: Path, sock: Path
) -> None:
    prefix = _without_dac_override()
    theirs = _others_dir(sock.parent / "theirs")
    line = refused_line(run_exod(tmp_path / "home", theirs / "exod.sock", prefix=prefix))
    assert line == (
        f"exod: cannot listen on {theirs / 'exod.sock'}: user {USER} may not write to {theirs}; "
        f"set EXOD_SOCKET or --socket to a path in a directory that {USER} can write"
    )


# ---- the command line ----


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (
            ("--idle-tt", "5"),
            {},
            "exod: unknown option --idle-tt; did you mean --idle-ttl? (see exod --help)",
        ),
        (
            ("--idle-ttl", "abc"),
            {},
            "exod: invalid --idle-ttl 'abc': expected seconds, 0 or more, e.g. 300",
        ),
        (
            (),
            {"EXOD_IDLE_TTL": "abc"},
            "exod: invalid EXOD_IDLE_TTL 'abc': expected seconds, 0 or more, e.g. 300",
        ),
        (
            (),
            {"EXOD_HTTP_MAX_BODY": "lots"},
            "exod: invalid EXOD_HTTP_MAX_BODY 'lots': expected a size in bytes, at least 1, such "
            "as 4M or 1048576 (not a percentage)",
        ),
    ],
)
def test_a_settings_mistake_says_what_a_valid_value_looks_like(
    tmp_path: Path, sock: Path, args: tuple[str, ...], env: dict[str, str], line: str
) -> None:
    assert refused_line(run_exod(tmp_path / "home", sock, *args, env=env)) == line
    assert not (tmp_path / "home").exists()  # refused before anything was written
