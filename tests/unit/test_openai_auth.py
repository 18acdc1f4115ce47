"""Who may use the HTTP API: Host headers that name this server, and the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exod.config import ConfigError
from exod.openai.auth import HostPolicy, is_ip_literal, key_matches, read_key, split_host

PORT = 52415
LOOPBACK = HostPolicy.for_bind("127.0.0.1", PORT)
KEY = b"k3y-0123456789abcdef"


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:52415",
        "LOCALHOST:52415",
        "127.0.0.1",
        "127.0.0.1:52415",
        "[::1]",
        "[::1]:52415",
        " localhost:52415 ",
    ],
)
def test_loopback_names_are_allowed(host: str) -> None:
    assert LOOPBACK.allows(host)


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "evil.example",
        "evil.example:52415",
        "localhost.evil.example",
        "localhost:52416",  # another port: another server's origin
        "localhost:",
        "localhost:port",
        "localhost:523456",
        "127.0.0.2",
        "192.168.1.10:52415",  # an address is not this server unless it listens on every one
        "::1",  # IPv6 only in brackets
        "[::1",
        "[::1]x",
        "[::1]:52415:1",
        "localhost:52415, evil.example",
    ],
)
def test_other_hosts_are_refused_on_loopback(host: str | None) -> None:
    assert not LOOPBACK.allows(host)


def test_the_bind_address_and_extra_names_are_allowed() -> None:
    policy = HostPolicy.for_bind("192.168.1.10", PORT, ("mybox.local", "[fd00::5]"))
    for host in ("192.168.1.10:52415", "mybox.local", "MyBox.Local:52415", "[fd00::5]:52415"):
        assert policy.allows(host), host
    assert policy.allows("localhost")
    assert not policy.allows("192.168.1.11")
    assert not policy.allows("otherbox.local")
    v6 = HostPolicy.for_bind("fd00::2", PORT)
    assert v6.allows("[fd00::2]:52415")


def test_every_interface_allows_any_address_but_no_other_name() -> None:
    for bind in ("0.0.0.0", "::"):
        policy = HostPolicy.for_bind(bind, PORT)
        assert policy.allows("192.168.1.10:52415")
        assert policy.allows("[fe80::1]")
        assert policy.allows("localhost")
        assert not policy.allows("evil.example")
        assert not policy.allows("192.168.1.10:80")


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("a", ("a", None)),
        ("a:1", ("a", 1)),
        ("[::1]:8", ("[::1]", 8)),
        ("[::1]", ("[::1]", None)),
        ("A.B", ("a.b", None)),
        (":80", None),
        ("a:-1", None),
        ("a:٣", None),  # a digit, but not an ASCII one
    ],
)
def test_split_host(header: str, want: tuple[str, int | None] | None) -> None:
    assert split_host(header) == want


def test_ip_literals() -> None:
    assert is_ip_literal("10.0.0.1")
    assert is_ip_literal("[::1]")
    assert not is_ip_literal("::1")
    assert not is_ip_literal("localhost")
    assert not is_ip_literal("[localhost]")


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (b"Bearer " + KEY, True),
        (b"bearer " + KEY, True),
        (b"Bearer  " + KEY + b" ", True),
        (None, False),
        (b"", False),
        (KEY, False),
        (b"Basic " + KEY, False),
        (b"Bearer", False),
        (b"Bearer ", False),
        (b"Bearer " + KEY[:-1], False),
        (b"Bearer " + KEY + b"x", False),
        (b"Bearer " + KEY.upper(), False),
    ],
)
def test_key_matches(header: bytes | None, ok: bool) -> None:
    assert key_matches(header, KEY) is ok


def test_read_key_strips_the_newline(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    assert read_key(path) == KEY


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"short",
        b"has a space in the middle!",
        b"caf\xc3\xa9-0123456789abcdef",
        b"x" * 5000,
    ],
)
def test_read_key_refuses_a_weak_or_odd_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="EXOD_API_KEY_FILE"):
        read_key(path)


def test_read_key_refuses_what_is_not_a_readable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_key(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_key(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_key(fifo)  # would block exod forever if it were opened
