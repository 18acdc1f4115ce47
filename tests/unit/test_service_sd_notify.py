"""The notify protocol's pure parts, and one real datagram per message kind."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from exod.service.notify import Notifier, message, socket_address, watchdog_period
from tests.daemon import short_dir


def test_socket_address_accepts_paths_and_the_abstract_namespace() -> None:
    assert socket_address("/run/user/1000/systemd/notify") == "/run/user/1000/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify") == (
        b"\0/org/freedesktop/systemd1/notify"
    )
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert socket_address(unusable) is None


def test_watchdog_period_is_half_of_watchdog_usec() -> None:
    assert watchdog_period({"WATCHDOG_USEC": "20000000"}, pid=7) == 10.0
    assert watchdog_period({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7"}, pid=7) == 0.5


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "8"},  # meant for another process
    ],
)
def test_watchdog_is_off_unless_meant_for_us(environ: dict[str, str]) -> None:
    assert watchdog_period(environ, pid=7) is None


def test_a_value_cannot_start_a_second_field() -> None:
    assert message(STATUS="line one\nWATCHDOG=1") == b"STATUS=line one WATCHDOG=1"
    assert message(READY="1", STATUS="ok") == b"READY=1\nSTATUS=ok"


def test_from_environ_takes_the_variables_out_so_children_do_not_inherit_them() -> None:
    environ = {
        "NOTIFY_SOCKET": "/run/n",
        "WATCHDOG_USEC": "4000000",
        "WATCHDOG_PID": str(os.getpid()),
        "HOME": "/h",
    }
    notifier = Notifier.from_environ(environ)
    assert notifier == Notifier("/run/n", 2.0)
    assert environ == {"HOME": "/h"}


def test_without_notify_socket_there_is_no_watchdog_and_sending_does_nothing() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "4000000"})
    assert notifier == Notifier(None, None)
    notifier.ready("serving")  # must not raise


@pytest.fixture
def manager() -> Iterator[tuple[socket.socket, Path]]:
    where = short_dir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(where / "notify"))
    sock.settimeout(5)
    yield sock, where / "notify"
    sock.close()
    (where / "notify").unlink()
    where.rmdir()


def test_each_notification_is_one_datagram(manager: tuple[socket.socket, Path]) -> None:
    sock, path = manager
    notifier = Notifier(str(path), 1.0)
    notifier.status("replaying")
    notifier.ready("serving on /s")
    notifier.ping()
    notifier.stopping("ending 1 runner(s)")
    got = [sock.recv(4096) for _ in range(4)]
    assert got == [
        b"STATUS=replaying",
        b"READY=1\nSTATUS=serving on /s",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=ending 1 runner(s)",
    ]


def test_a_manager_that_went_away_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Notifier(str(tmp_path / "gone"), None).ping()
    assert "cannot notify the service manager" in caplog.text
