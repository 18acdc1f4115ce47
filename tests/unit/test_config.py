from __future__ import annotations

from pathlib import Path

import pytest

from exod import config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_platform() -> None:
    env = {"HOME": "/home/u"}
    assert config.default_home(env, "linux") == Path("/home/u/.local/state/exod")
    assert config.default_home({**env, "XDG_STATE_HOME": "/s"}, "linux") == Path("/s/exod")
    assert config.default_home(env, "darwin") == Path("/home/u/Library/Application Support/exod")


def test_flag_beats_env_beats_default() -> None:
    env = {"HOME": "/h", "EXOD_IDLE_TTL": "7"}
    assert config.load({}, env).idle_ttl == 7
    assert config.load({"idle_ttl": "9"}, env).idle_ttl == 9
    assert config.load({}, {"HOME": "/h"}).idle_ttl == 300


def test_socket_defaults_into_home() -> None:
    s = config.load({"home": "/tmp/x"}, {"HOME": "/h"})
    assert s.socket == Path("/tmp/x/exod.sock")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("idle_ttl", "-1"),
        ("idle_ttl", "soon"),
        ("idle_ttl", "nan"),
        ("kill_grace", "inf"),
        ("queue_depth", "0"),
        ("max_prompt_tokens", "-5"),
        ("log_level", "loud"),
        ("home", ""),
    ],
)
def test_invalid_values_are_config_errors_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load({name: value}, {"HOME": "/h"})
    env = next(s.env for s in config.SETTINGS if s.name == name)
    assert env in str(err.value)


def test_too_long_socket_path_is_a_config_error() -> None:
    with pytest.raises(config.ConfigError, match="EXOD_SOCKET"):
        config.load({"socket": "/tmp/" + "s" * 120}, {"HOME": "/h"})


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for s in config.SETTINGS:
        assert f"`{s.env}`" in doc and f"`{s.flag}`" in doc, s.env
