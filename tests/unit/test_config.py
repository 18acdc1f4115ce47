from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

import pytest

from exod import config, home

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_platform() -> None:
    env = {"HOME": "/home/u"}
    assert home.default_home(env, "linux") == Path("/home/u/.local/state/exod")
    assert home.default_home({**env, "XDG_STATE_HOME": "/s"}, "linux") == Path("/s/exod")
    assert home.default_home(env, "darwin") == Path("/home/u/Library/Application Support/exod")


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
def test_invalid_values_are_config_errors_naming_what_was_set(name: str, value: str) -> None:
    setting = next(s for s in config.SETTINGS if s.name == name)
    with pytest.raises(config.ConfigError, match=f"^invalid {setting.flag} "):
        config.load({name: value}, {"HOME": "/h"})
    with pytest.raises(config.ConfigError, match=f"^invalid {setting.env} "):
        config.load({}, {"HOME": "/h", setting.env: value})


def test_too_long_socket_path_is_a_config_error() -> None:
    with pytest.raises(config.ConfigError, match="EXOD_SOCKET"):
        config.load({"socket": "/tmp/" + "s" * 120}, {"HOME": "/h"})


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for s in config.SETTINGS:
        assert f"`{s.env}`" in doc and f"`{s.flag}`" in doc, s.env


# ---- what an invalid value is told ----

ENV = {"HOME": "/h"}
# Python's own words for a failed conversion, which must never reach the user.
PYTHON_WORDS = ("could not convert", "invalid literal", "does not appear to be", "No closing")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("idle_ttl", "abc", "expected seconds, 0 or more, e.g. 300"),
        ("idle_ttl", "-1", "expected seconds, 0 or more, e.g. 300"),
        ("kill_grace", "nan", "expected seconds, 0 or more"),
        ("load_timeout", "0", "expected seconds, more than 0, e.g. 60"),
        ("queue_timeout", "soon", "expected seconds, more than 0"),
        ("queue_depth", "1.5", "expected a whole number, 1 or more, e.g. 16"),
        ("snapshot_every", "0", "expected a whole number, 1 or more"),
        ("log_level", "loud", "expected one of debug, info, warning, error"),
        ("max_runner_memory", "lots", "expected a size such as 8G, 512M or 1073741824"),
        ("max_runner_memory", "abc%", "or a percentage of RAM above 0 and at most 100"),
        ("max_runner_memory", "150%", "or a percentage of RAM above 0 and at most 100"),
        ("max_runner_memory", "0", "a cap of 0 would refuse every model"),
        ("reserved_memory", "8X", "expected a size such as 8G"),
        ("runner_wrapper", "nice 'x", "expected a command prefix split like a shell would"),
        ("http_port", "http", "expected a TCP port, 1 to 65535, or 0 to turn the HTTP API off"),
        ("http_port", "70000", "expected a TCP port"),
        ("http_bind", "localhost", "expected an IP address such as 127.0.0.1"),
        ("http_hosts", "a b", "expected host names separated by commas"),
        ("http_max_body", "10%", "expected a size in bytes, at least 1, such as 4M"),
        ("http_max_body", "0", "expected a size in bytes"),
        ("home", "", "expected a path, not an empty value"),
        ("node_name", "", "expected a name of 1 to 63 printable characters"),
        ("node_name", "x" * 64, "expected a name of 1 to 63 printable characters"),
        ("node_name", "a\tb", "expected a name of 1 to 63 printable characters"),
        ("stream_interval", "-0.1", "expected seconds, 0 or more"),
        ("peer_port", "0", "expected a TCP port, 1 to 65535"),
        ("join_port", "65536", "expected a TCP port, 1 to 65535"),
        ("peer_bind", "my-mac.local", "expected an IP address"),
        ("peer_timeout", "0", "expected seconds, more than 0"),
        ("cert_lifetime", "1y", "expected a duration of at least one hour"),
        ("cert_lifetime", "59", "expected a duration of at least one hour"),
        ("mdns_interfaces", "10.0.0.1,eth0", "'eth0' is not one"),
    ],
)
def test_an_invalid_value_says_what_a_valid_one_looks_like(
    name: str, value: str, expected: str
) -> None:
    s = next(s for s in config.SETTINGS if s.name == name)
    with pytest.raises(config.ConfigError) as as_flag:
        config.load({name: value}, ENV)
    with pytest.raises(config.ConfigError) as as_env:
        config.load({}, {**ENV, s.env: value})
    # Named once, as the user gave it: the flag, or the variable.
    assert str(as_flag.value).startswith(f"invalid {s.flag} {value!r}: ")
    assert s.env not in str(as_flag.value)
    assert str(as_env.value).startswith(f"invalid {s.env} {value!r}: ")
    assert s.flag not in str(as_env.value)
    for message in (str(as_flag.value), str(as_env.value)):
        assert expected in message
        assert "\n" not in message
        assert not any(words in message for words in PYTHON_WORDS), message


def test_the_node_name_is_the_host_name_without_its_domain_unless_set() -> None:
    assert config.load({}, ENV).node_name == socket.gethostname().split(".")[0]
    assert config.load({}, {**ENV, "EXOD_NODE_NAME": " studio "}).node_name == "studio"


def test_the_cluster_settings() -> None:
    s = config.load({}, ENV)
    assert (s.peer_port, s.join_port, s.peer_bind, s.peer_timeout) == (52416, 52417, "0.0.0.0", 10)
    assert s.cert_lifetime == 365 * 86400 and s.mdns_interfaces == ()
    env = {**ENV, "EXOD_CERT_LIFETIME": "12h", "EXOD_MDNS_INTERFACES": " 10.0.0.5, fe80::1 ,"}
    s = config.load({}, env)
    assert s.cert_lifetime == 12 * 3600 and s.mdns_interfaces == ("10.0.0.5", "fe80::1")
    assert config.load({}, {**ENV, "EXOD_CERT_LIFETIME": "7200"}).cert_lifetime == 7200


def test_the_peer_and_join_ports_must_differ() -> None:
    with pytest.raises(config.ConfigError, match=r"^EXOD_PEER_PORT and --join-port are both 9000"):
        config.load({"join_port": "9000"}, {**ENV, "EXOD_PEER_PORT": "9000"})


def test_the_ring_port_differs_from_the_peer_and_join_ports() -> None:
    assert config.load({}, ENV).ring_port == 52418
    with pytest.raises(config.ConfigError, match=r"^EXOD_RING_PORT and EXOD_JOIN_PORT are both"):
        config.load({}, {**ENV, "EXOD_RING_PORT": "52417"})
    with pytest.raises(config.ConfigError, match=r"^--ring-port and EXOD_PEER_PORT are both 9000"):
        config.load({"ring_port": "9000"}, {**ENV, "EXOD_PEER_PORT": "9000"})


def test_a_flag_wins_so_its_name_is_the_one_reported() -> None:
    with pytest.raises(config.ConfigError, match=r"^invalid --idle-ttl 'x': "):
        config.load({"idle_ttl": "x"}, {**ENV, "EXOD_IDLE_TTL": "5"})


def test_the_key_requirement_names_the_bind_as_it_was_given() -> None:
    with pytest.raises(config.ConfigError, match=r"^--http-bind 0\.0\.0\.0 is reachable"):
        config.load({"http_bind": "0.0.0.0"}, ENV)
    with pytest.raises(config.ConfigError, match=r"^EXOD_HTTP_BIND 0\.0\.0\.0 is reachable"):
        config.load({}, {**ENV, "EXOD_HTTP_BIND": "0.0.0.0"})


def test_memory_sizes_and_percentages_parse() -> None:
    assert config.parse_memory("8G", 0) == 8 << 30
    assert config.parse_memory("512MiB", 0) == 512 << 20
    assert config.parse_memory("1073741824", 0) == 1 << 30
    assert config.parse_memory(" 75 % ", 1000) == 750
    for bad in ("abc%", "0%", "101%", "%", "8X", ""):
        with pytest.raises(ValueError):
            config.parse_memory(bad, 1000)


def _doc_defaults() -> dict[str, str]:
    """EXOD_X -> the default cell of docs/configuration.md's table."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`EXOD_"):
            rows[cells[0].strip("`")] = cells[2]
    return rows


@pytest.mark.parametrize("setting", [s for s in config.SETTINGS if s.default(ENV)], ids=str)
def test_the_docs_give_the_default_that_exod_help_gives(setting: config.Setting) -> None:
    if setting.name in ("home", "node_name"):  # this machine's: the docs say what it is
        return
    assert _doc_defaults()[setting.env] == f"`{setting.default(ENV)}`"


def test_help_and_docs_say_reserved_memory_is_checked_when_a_runner_starts() -> None:
    """What the admission code does with it (exod/runners/admission.py), in both texts."""
    help_ = next(s.help for s in config.SETTINGS if s.name == "reserved_memory")
    doc = next(
        line
        for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
        if line.startswith("| `EXOD_RESERVED_MEMORY`")
    )
    assert "when a runner is started" in help_ and "evicts idle runners" in help_
    assert "when a new runner is to be started" in doc and "evicts idle runners" in doc
    assert "waits" not in help_  # it never waits: it evicts or refuses at once


# ---- exod's command line ----


def _exod_args(*argv: str) -> tuple[int, str]:
    from exod.__main__ import parse

    err = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(err):
        parse(list(argv))
    return int(exited.value.code or 0), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (("--idle-tt", "5"), "exod: unknown option --idle-tt; did you mean --idle-ttl?"),
        (("--idle-tt=5",), "exod: unknown option --idle-tt; did you mean --idle-ttl?"),
        (("--hom", "/x"), "exod: unknown option --hom; did you mean --home?"),
        (("--http",), "exod: unknown option --http; did you mean --http-port?"),
        (("--zzz",), "exod: unknown option --zzz"),
        (("serve",), "exod: unexpected argument 'serve': exod takes only options"),
        (("--idle-ttl",), "exod: --idle-ttl needs a value"),
    ],
)
def test_exod_refuses_abbreviated_and_unknown_options_with_78(
    argv: tuple[str, ...], line: str
) -> None:
    code, err = _exod_args(*argv)
    assert code == 78
    assert err == f"{line} (see exod --help)\n"


def test_exod_takes_full_options() -> None:
    from exod.__main__ import parse

    flags = parse(["--idle-ttl", "5", "--home=/x"])
    assert (flags["idle_ttl"], flags["home"], flags["socket"]) == ("5", "/x", None)
