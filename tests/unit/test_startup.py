"""exod's start-up refusals: what stands in the way of a path, said in one line, and the exit
code that keeps a service manager from restarting exod into the same mistake."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from exod import config, daemon
from exod.errors import Exit
from exod.eventlog import StoreError

USER = config.user_name()


def attempt_mkdir(path: Path) -> OSError:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e
    raise AssertionError(f"mkdir {path} worked")


def test_a_file_on_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    err = attempt_mkdir(tmp_path / "f" / "a" / "b")
    assert daemon.path_problem(tmp_path / "f" / "a" / "b", err) == (
        f"{tmp_path / 'f'} is a file, not a directory"
    )


def test_a_file_where_the_directory_goes_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    err = attempt_mkdir(tmp_path / "f")
    assert (
        daemon.path_problem(tmp_path / "f", err) == f"{tmp_path / 'f'} is a file, not a directory"
    )


def test_a_directory_where_a_file_goes_is_named(tmp_path: Path) -> None:
    (tmp_path / "node_id").mkdir()
    with pytest.raises(OSError) as raised:
        (tmp_path / "node_id").read_text()
    assert daemon.path_problem(tmp_path / "node_id", raised.value) == (
        f"{tmp_path / 'node_id'} is a directory"
    )


def test_permission_and_read_only_name_the_nearest_existing_directory(tmp_path: Path) -> None:
    wanted = tmp_path / "a" / "b"
    denied = PermissionError(errno.EACCES, "Permission denied", str(wanted))
    assert daemon.path_problem(wanted, denied) == f"user {USER} may not write to {tmp_path}"
    read_only = OSError(errno.EROFS, "Read-only file system", str(wanted))
    assert daemon.path_problem(wanted, read_only) == f"{tmp_path} is on a read-only file system"


def test_a_full_disk_is_temporary_and_everything_else_a_configuration_mistake(
    tmp_path: Path,
) -> None:
    full = daemon.cannot("create its home", tmp_path, OSError(errno.ENOSPC, "No space"), "fix")
    assert (full.code, str(full)) == (
        Exit.TEMPFAIL,
        f"cannot create its home {tmp_path}: the disk is full; free some space",
    )
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "h"))
    refused = daemon.cannot("create its home", tmp_path / "h", denied, daemon.HOME_FIX)
    assert refused.code == Exit.CONFIG
    assert str(refused) == (
        f"cannot create its home {tmp_path / 'h'}: user {USER} may not write to {tmp_path}; "
        f"set EXOD_HOME or --home to a directory that {USER} can write"
    )


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StoreError("damaged", unusable=True), Exit.CONFIG),
        (StoreError("full", disk_full=True), Exit.TEMPFAIL),
        (StoreError("locked", busy=True), Exit.TEMPFAIL),
        (StoreError("something else"), Exit.INTERNAL),
    ],
)
def test_an_event_log_that_cannot_be_used_is_78_not_a_bug(error: StoreError, code: Exit) -> None:
    assert daemon.store_exit(error) == code


def test_identity_files_are_made_once_then_read(tmp_path: Path) -> None:
    path = tmp_path / "node_id"
    assert daemon.read_or_create(path, "n-1", daemon.valid_node_id) == "n-1"
    assert daemon.read_or_create(path, "n-2", daemon.valid_node_id) == "n-1"


@pytest.mark.parametrize("content", [b"", b"zz\n", b"\xff\xfe", b"ab c"])
def test_a_damaged_identity_file_is_refused_with_78(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    with pytest.raises(daemon.Refused) as refused:
        daemon.read_or_create(path, "00" * 32, daemon.valid_secret)
    assert refused.value.code == Exit.CONFIG
    assert str(refused.value).startswith(f"{path} is damaged")
    assert path.read_bytes() == content  # left for the user to look at


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_socket_path_taken_by_something_else_is_refused_and_left_alone(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "exod.sock"
    if kind == "file":
        path.write_text("precious")
    else:
        path.mkdir()
    with pytest.raises(daemon.Refused) as refused:
        daemon.check_socket_path(path)
    assert refused.value.code == Exit.CONFIG
    assert str(refused.value) == (
        f"cannot listen on {path}: it is a {kind}, not a socket; move it aside, or set "
        "EXOD_SOCKET or --socket to another path"
    )
    assert path.read_text() == "precious" if kind == "file" else path.is_dir()


def test_a_stale_socket_passes_the_check(tmp_path: Path) -> None:
    path = tmp_path / "d" / "exod.sock"
    daemon.check_socket_path(path)  # makes its directory
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    daemon.check_socket_path(path)  # a socket is for control_server to probe and clear
