"""The HTTP API's settings: defaults, parsing, and the one combination that is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from exod import config

ENV = {"HOME": "/h"}


def test_defaults_serve_loopback_without_a_key() -> None:
    s = config.load({}, ENV)
    assert s.http_port == 52415
    assert s.http_bind == "127.0.0.1"
    assert s.http_hosts == ()
    assert s.api_key_file is None
    assert s.http_max_body == 4 * 1024 * 1024


def test_values_are_parsed() -> None:
    s = config.load(
        {
            "http_port": "0",
            "http_bind": "::1",
            "http_hosts": " MyBox.local, ,[fd00::5] ",
            "api_key_file": "/etc/exod/key",
            "http_max_body": "1M",
        },
        ENV,
    )
    assert s.http_port == 0
    assert s.http_bind == "::1"
    assert s.http_hosts == ("mybox.local", "[fd00::5]")
    assert s.api_key_file == Path("/etc/exod/key")
    assert s.http_max_body == 1 << 20
    assert config.load({"http_bind": "0:0:0:0:0:0:0:1"}, ENV).http_bind == "::1"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("http_port", "-1"),
        ("http_port", "65536"),
        ("http_port", "http"),
        ("http_bind", "localhost"),
        ("http_bind", "127.0.0.1:80"),
        ("http_bind", ""),
        ("http_hosts", "a b"),
        ("http_hosts", "evil/x"),
        ("http_max_body", "0"),
        ("http_max_body", "10%"),
        ("http_max_body", "big"),
    ],
)
def test_invalid_values_name_their_variable(name: str, value: str) -> None:
    env = next(s.env for s in config.SETTINGS if s.name == name)
    with pytest.raises(config.ConfigError, match=env):
        config.load({}, {**ENV, env: value})


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.168.1.10", "fd00::2"])
def test_beyond_loopback_needs_a_key_file(bind: str) -> None:
    with pytest.raises(config.ConfigError, match="EXOD_API_KEY_FILE"):
        config.load({"http_bind": bind}, ENV)
    s = config.load({"http_bind": bind, "api_key_file": "/k"}, ENV)
    assert s.http_bind == bind


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.5", "::1"])
def test_loopback_needs_no_key(bind: str) -> None:
    assert config.load({"http_bind": bind}, ENV).api_key_file is None


def test_beyond_loopback_is_fine_while_the_api_is_off() -> None:
    assert config.load({"http_bind": "0.0.0.0", "http_port": "0"}, ENV).http_port == 0


def test_settings_come_from_the_environment_too() -> None:
    env = {**ENV, "EXOD_HTTP_PORT": "8080", "EXOD_API_KEY_FILE": "/k", "EXOD_HTTP_BIND": "::"}
    s = config.load({}, env)
    assert (s.http_port, s.http_bind, s.api_key_file) == (8080, "::", Path("/k"))
