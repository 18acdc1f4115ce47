"""Every setting of exod in one place: its flag, its environment variable, its default.

Precedence: flag, then environment, then default. `exod --help` prints this table. A value that
does not parse or is out of range raises ConfigError, which exod turns into exit 78 so that a
service manager does not restart-loop on a configuration mistake.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shlex
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from exod.home import MAX_SOCKET_PATH, default_home

T = TypeVar("T")


class ConfigError(Exception):
    """A setting is invalid; the message names it and says what is accepted."""


@dataclass(frozen=True)
class Settings:
    home: Path
    socket: Path
    idle_ttl: float
    max_prompt_tokens: int
    queue_depth: int
    log_level: str
    snapshot_every: int
    kill_grace: float
    load_stall_timeout: float
    load_timeout: float
    decode_stall_timeout: float
    queue_timeout: float
    import_stall_timeout: float
    max_runner_memory: int
    reserved_memory: int
    runner_wrapper: tuple[str, ...]
    http_port: int
    http_bind: str
    http_hosts: tuple[str, ...]
    api_key_file: Path | None
    http_max_body: int
    parallel: int
    prompt_cache_bytes: int
    mlx_cache_limit: int
    stream_interval: float
    node_name: str
    peer_port: int
    join_port: int
    ring_port: int
    peer_bind: str
    peer_timeout: float
    cert_lifetime: int
    mdns_interfaces: tuple[str, ...]
    keep_awake: bool
    model_cache_bytes: int


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: Callable[[Mapping[str, str]], str]
    parse: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def user_name() -> str:
    """The user exod runs as, for messages about files it may not write."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no name (a container's arbitrary uid)
        return f"uid {os.geteuid()}"


def _parsed(kind: Callable[[str], T], text: str, expected: str) -> T:
    """`kind(text)`, or a ValueError saying what was expected instead of Python's own words."""
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(expected) from None


# Each parser's error says what a valid value looks like; load() prefixes the name and the value.
_SECONDS = "expected seconds, 0 or more, e.g. 300"
_POSITIVE_SECONDS = "expected seconds, more than 0, e.g. 60"
_POSITIVE_INT = "expected a whole number, 1 or more, e.g. 16"
_LOG_LEVELS = "expected one of debug, info, warning, error"
_MEMORY = (
    "expected a size such as 8G, 512M or 1073741824 (bytes), or a percentage of RAM above 0 "
    "and at most 100, such as 75%"
)
_BYTES = "expected a size in bytes, at least 1, such as 4M or 1048576 (not a percentage)"
_PORT = "expected a TCP port, 1 to 65535, or 0 to turn the HTTP API off"
_IP = "expected an IP address such as 127.0.0.1, ::1 or 0.0.0.0, not a host name"
_HOSTS = "expected host names separated by commas, e.g. mybox.local,mybox (IPv6 in brackets)"
_PEER_PORT = "expected a TCP port, 1 to 65535"
_LIFETIME = (
    "expected a duration of at least one hour: seconds (31536000), or days or hours (365d, 12h)"
)
_INTERFACES = "expected IP addresses separated by commas, e.g. 192.168.1.20,10.0.0.5 (empty: all)"
_NODE_NAME = "expected a name of 1 to 63 printable characters, e.g. studio or mac-mini-2"
_SWITCH = "expected 1 (on) or 0 (off)"
_COMMAND = "expected a command prefix split like a shell would, e.g. 'nice -n 10'"
_SHARE = (
    "expected a size such as 2G, 512M or 1073741824 (bytes), 0 for none, or a percentage of "
    "EXOD_MAX_RUNNER_MEMORY from 0 to 100, such as 25%"
)
_DISK_SHARE = (
    "expected a size such as 200G, 512M or 1073741824 (bytes), 0 for none, or a percentage of "
    "the disk that holds EXOD_HOME from 0 to 100, such as 25%"
)


def _seconds(text: str) -> float:
    value = _parsed(float, text, _SECONDS)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise ValueError(_SECONDS)
    return value


def _positive_seconds(text: str) -> float:
    value = _parsed(float, text, _POSITIVE_SECONDS)
    if not 0 < value < float("inf"):
        raise ValueError(_POSITIVE_SECONDS)
    return value


def _positive_int(text: str) -> int:
    value = _parsed(int, text, _POSITIVE_INT)
    if value < 1:
        raise ValueError(_POSITIVE_INT)
    return value


def default_node_name() -> str:
    """The host name without its domain (a Mac's `studio.local` is `studio`)."""
    return socket.gethostname().split(".")[0] or "node"


def _node_name(text: str) -> str:
    name = text.strip()
    if not 0 < len(name) <= 63 or not name.isprintable():
        raise ValueError(_NODE_NAME)
    return name


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(_LOG_LEVELS)
    return level


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def parse_memory(text: str, total: int) -> int:
    """Bytes from `8589934592`, `8G`, `8GiB`, `512M` or `75%` (of `total`, the machine's RAM).

    Raises ValueError (without a message worth showing: callers say what they expected).
    """
    t = text.strip().lower()
    percent = _PERCENT.fullmatch(t)
    if percent is not None:
        value = float(percent.group(1))
        if not 0 < value <= 100:
            raise ValueError("a percentage must be above 0 and at most 100")
        return int(total * value / 100)
    size = _SIZE.fullmatch(t)
    if size is None:
        raise ValueError("not a size")
    return int(float(size.group(1)) * _UNITS[size.group(2)])


def _memory(text: str) -> int:
    import psutil  # only here: the rest of config stays importable without it

    return _parsed(lambda t: parse_memory(t, psutil.virtual_memory().total), text, _MEMORY)


def _memory_cap(text: str) -> int:
    # A cap of 0 bytes would refuse every model, long after start: refuse it now instead.
    value = _memory(text)
    if value < 1:
        raise ValueError(f"{_MEMORY}; a cap of 0 would refuse every model")
    return value


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "on", "true", "yes"}:
        return True
    if value in {"0", "off", "false", "no"}:
        return False
    raise ValueError(_SWITCH)


def _command(text: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(text))
    except ValueError as e:  # shlex's words ("No closing quotation") are worth keeping
        raise ValueError(f"{_COMMAND}: {str(e).lower()}") from None


def _port(text: str) -> int:
    value = _parsed(int, text, _PORT)
    if not 0 <= value <= 65535:
        raise ValueError(_PORT)
    return value


def _peer_port(text: str) -> int:
    value = _parsed(int, text, _PEER_PORT)
    if not 0 < value <= 65535:
        raise ValueError(_PEER_PORT)
    return value


_DURATION = re.compile(r"(\d+)\s*([dh]?)")


def _lifetime(text: str) -> int:
    """Seconds from `31536000`, `365d` or `12h`; at least an hour (renewal runs at two thirds)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(_LIFETIME)
    value = int(match.group(1)) * {"": 1, "h": 3600, "d": 86400}[match.group(2)]
    if value < 3600:
        raise ValueError(_LIFETIME)
    return value


def _interfaces(text: str) -> tuple[str, ...]:
    addresses = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            addresses.append(
                str(_parsed(ipaddress.ip_address, part, f"{_INTERFACES}; {part!r} is not one"))
            )
    return tuple(addresses)


def _ip_address(text: str) -> str:
    return str(_parsed(ipaddress.ip_address, text, _IP))


def _host_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    for name in names:
        if not re.fullmatch(r"[a-z0-9._-]+|\[[0-9a-f:.]+\]", name):
            raise ValueError(f"{_HOSTS}; {name!r} is not one")
    return names


def _bytes(text: str) -> int:
    value = -1 if "%" in text else _parsed(lambda t: parse_memory(t, 0), text, _BYTES)
    if value < 1:
        raise ValueError(_BYTES)
    return value


@dataclass(frozen=True)
class Share:
    """A size given either in bytes or as a fraction of a whole resolved in load (the runner
    memory cap, or the disk)."""

    bytes: int
    fraction: float | None  # set when the size was a percentage

    def of(self, cap: int) -> int:
        return self.bytes if self.fraction is None else int(cap * self.fraction)


def _share(text: str) -> Share:
    percent = _PERCENT.fullmatch(text.strip().lower())
    if percent is not None:
        value = float(percent.group(1))
        if not 0 <= value <= 100:
            raise ValueError(_SHARE)
        return Share(0, value / 100)
    return Share(_parsed(lambda t: parse_memory(t, 0), text, _SHARE), None)


def _disk_share(text: str) -> Share:
    percent = _PERCENT.fullmatch(text.strip().lower())
    if percent is not None:
        value = float(percent.group(1))
        if not 0 <= value <= 100:
            raise ValueError(_DISK_SHARE)
        return Share(0, value / 100)
    return Share(_parsed(lambda t: parse_memory(t, 0), text, _DISK_SHARE), None)


def disk_size(path: Path) -> int:
    """The size of the filesystem that holds `path`, or would once it is made (its nearest
    existing parent's)."""
    for parent in (path, *path.parents):
        try:
            usage = os.statvfs(parent)
        except OSError:
            continue
        return usage.f_blocks * usage.f_frsize
    return 0


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _path(text: str) -> Path:
    if not text:
        raise ValueError("expected a path, not an empty value")
    return Path(text).expanduser().absolute()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "home",
        "EXOD_HOME",
        lambda env: str(default_home(env)),
        _path,
        "state dir, created if missing: the event log, node id, prompt secret, runner logs, models",
    ),
    Setting(
        "socket",
        "EXOD_SOCKET",
        lambda env: "",  # filled in from home below
        lambda t: _path(t) if t else None,
        "control socket exoctl talks to, at most 103 bytes (unset: exod.sock in the state dir)",
    ),
    Setting(
        "idle_ttl",
        "EXOD_IDLE_TTL",
        lambda env: "300",
        _seconds,
        "seconds an idle runner keeps its model loaded; 0 stops it as soon as it is idle",
    ),
    Setting(
        "max_prompt_tokens",
        "EXOD_MAX_PROMPT_TOKENS",
        lambda env: "32768",
        _positive_int,
        "longest prompt accepted, in tokens (the model's context is a limit too)",
    ),
    Setting(
        "queue_depth",
        "EXOD_QUEUE_DEPTH",
        lambda env: "16",
        _positive_int,
        "runs that may wait for a busy runner before new ones are refused",
    ),
    Setting(
        "parallel",
        "EXOD_PARALLEL",
        lambda env: "4",
        _positive_int,
        "generations one runner runs at once, batched; more wait in its queue",
    ),
    Setting(
        "prompt_cache_bytes",
        "EXOD_PROMPT_CACHE_BYTES",
        lambda env: "25%",
        _share,
        "bound of a runner's prompt cache (the KV of recent prompts, reused by a prompt that "
        "extends one): bytes, or a percentage of EXOD_MAX_RUNNER_MEMORY; 0 turns it off",
    ),
    Setting(
        "mlx_cache_limit",
        "EXOD_MLX_CACHE_LIMIT",
        lambda env: "10%",
        _share,
        "bound of MLX's buffer cache in a runner (freed buffers kept for reuse): bytes, or a "
        "percentage of EXOD_MAX_RUNNER_MEMORY; 0 leaves MLX's own limit",
    ),
    Setting(
        "stream_interval",
        "EXOD_STREAM_INTERVAL",
        lambda env: "0.02",
        _seconds,
        "seconds between two pieces of one generation's text when tokens come faster (the "
        "first goes at once); 0 sends every token as it comes",
    ),
    Setting(
        "node_name",
        "EXOD_NODE_NAME",
        lambda env: default_node_name(),
        _node_name,
        "this node's name, shown to people beside its id (the host name by default)",
    ),
    Setting(
        "peer_port",
        "EXOD_PEER_PORT",
        lambda env: "52416",
        _peer_port,
        "TCP port members of this node's cluster call it on (mutual TLS); nothing listens on it "
        "until the node belongs to a cluster",
    ),
    Setting(
        "join_port",
        "EXOD_JOIN_PORT",
        lambda env: "52417",
        _peer_port,
        "TCP port a node joining with an invite calls (TLS; it can only present the invite); "
        "open on every member, which passes the join on to the node holding the CA key",
    ),
    Setting(
        "ring_port",
        "EXOD_RING_PORT",
        lambda env: "52418",
        _peer_port,
        "TCP port, on EXOD_PEER_BIND's address, of the MLX ring of the split model this node "
        "runs a rank of (plaintext, unauthenticated; open only while one runs)",
    ),
    Setting(
        "peer_bind",
        "EXOD_PEER_BIND",
        lambda env: "0.0.0.0",  # noqa: S104  # peers on the LAN must reach it; mTLS guards it
        _ip_address,
        "address the peer and join ports listen on; 0.0.0.0 is every IPv4 interface",
    ),
    Setting(
        "peer_timeout",
        "EXOD_PEER_TIMEOUT",
        lambda env: "10",
        _positive_seconds,
        "seconds until a silent peer counts as unreachable (a join gives up after this)",
    ),
    Setting(
        "cert_lifetime",
        "EXOD_CERT_LIFETIME",
        lambda env: "365d",
        _lifetime,
        "how long a certificate this node signs lasts: seconds, or days or hours (365d, 12h)",
    ),
    Setting(
        "mdns_interfaces",
        "EXOD_MDNS_INTERFACES",
        lambda env: "",
        _interfaces,
        "addresses of the interfaces mDNS announces and browses on, comma-separated (empty: all)",
    ),
    Setting(
        "keep_awake",
        "EXOD_KEEP_AWAKE",
        lambda env: "1",
        _switch,
        "keep the machine from idle sleep while a run is in flight (caffeinate on macOS, "
        "systemd-inhibit on Linux); 0 lets it sleep",
    ),
    Setting(
        "log_level",
        "EXOD_LOG_LEVEL",
        lambda env: "info",
        _log_level,
        "debug, info, warning or error",
    ),
    Setting(
        "kill_grace",
        "EXOD_KILL_GRACE",
        lambda env: "5",
        _seconds,
        "seconds between SIGTERM and SIGKILL when a runner is ended",
    ),
    Setting(
        "load_stall_timeout",
        "EXOD_LOAD_STALL_TIMEOUT",
        lambda env: "60",
        _positive_seconds,
        "seconds a loading runner may go without progress (phase, layer, prefill)",
    ),
    Setting(
        "load_timeout",
        "EXOD_LOAD_TIMEOUT",
        lambda env: "900",
        _positive_seconds,
        "seconds a load may take in all, however steadily it progresses",
    ),
    Setting(
        "decode_stall_timeout",
        "EXOD_DECODE_STALL_TIMEOUT",
        lambda env: "60",
        _positive_seconds,
        "seconds a generation may go without a token once prefill is done",
    ),
    Setting(
        "queue_timeout",
        "EXOD_QUEUE_TIMEOUT",
        lambda env: "600",
        _positive_seconds,
        "seconds a run may wait in a runner's queue before it is refused",
    ),
    Setting(
        "import_stall_timeout",
        "EXOD_IMPORT_STALL_TIMEOUT",
        lambda env: "120",
        _positive_seconds,
        "seconds a model import (GGUF conversion) may go without progress before it is ended",
    ),
    Setting(
        "max_runner_memory",
        "EXOD_MAX_RUNNER_MEMORY",
        lambda env: "90%",
        _memory_cap,
        "cap on one runner's whole process tree (USS), bytes or a percentage of RAM: a runner "
        "over it is ended, a model estimated above it is refused",
    ),
    Setting(
        "reserved_memory",
        "EXOD_RESERVED_MEMORY",
        lambda env: "1G",
        _memory,
        "memory kept free for everything else when a runner is started: a model whose estimate "
        "does not fit in available memory minus this evicts idle runners, else is refused",
    ),
    Setting(
        "model_cache_bytes",
        "EXOD_MODEL_CACHE_BYTES",
        lambda env: "25%",
        _disk_share,
        "bound of the models this node keeps for its cluster (a split model's layers that "
        "members sent it, in the state dir's cache/models), least recently used evicted first: "
        "bytes, or a percentage of the disk that holds the state dir; 0 keeps none",
    ),
    Setting(
        "runner_wrapper",
        "EXOD_RUNNER_WRAPPER",
        lambda env: "",
        _command,
        "command prefix for every runner, e.g. 'nice -n 10' or 'taskset -c 0-3'",
    ),
    Setting(
        "http_port",
        "EXOD_HTTP_PORT",
        lambda env: "52415",
        _port,
        "TCP port of the OpenAI-compatible HTTP API; 0 turns it off",
    ),
    Setting(
        "http_bind",
        "EXOD_HTTP_BIND",
        lambda env: "127.0.0.1",
        _ip_address,
        "address the HTTP API listens on; beyond loopback it needs EXOD_API_KEY_FILE",
    ),
    Setting(
        "http_hosts",
        "EXOD_HTTP_HOSTS",
        lambda env: "",
        _host_names,
        "more names the HTTP API answers to in the Host header, comma-separated",
    ),
    Setting(
        "api_key_file",
        "EXOD_API_KEY_FILE",
        lambda env: "",
        lambda t: _path(t) if t else None,
        "file holding the key every HTTP request must bring as 'Authorization: Bearer KEY'",
    ),
    Setting(
        "http_max_body",
        "EXOD_HTTP_MAX_BODY",
        lambda env: "4M",
        _bytes,
        "largest HTTP request body accepted, in bytes (4M, 1048576)",
    ),
    Setting(
        "snapshot_every",
        "EXOD_SNAPSHOT_EVERY",
        lambda env: "500",
        _positive_int,
        "events between snapshots of the folded state",
    ),
)


def load(flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (by setting name; None when not given), the environment and defaults.

    A ConfigError's message is one line that names what the user set (the flag when it came
    from a flag, the variable when from the environment) and what a valid value looks like.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    named: dict[str, str] = {}
    for s in SETTINGS:
        flag = flags.get(s.name)
        raw = flag if flag is not None else env.get(s.env, s.default(env))
        named[s.name] = s.flag if flag is not None else s.env
        try:
            values[s.name] = s.parse(raw)
        except ValueError as e:
            who = named[s.name] if flag is not None or s.env in env else f"default {s.env}"
            raise ConfigError(f"invalid {who} {raw!r}: {e}") from None
    if values["socket"] is None:
        values["socket"] = values["home"] / "exod.sock"
    size = len(os.fsencode(values["socket"]))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket path {values['socket']} is {size} bytes, longer than the {MAX_SOCKET_PATH} "
            "a Unix socket allows: set EXOD_SOCKET or --socket to a shorter path"
        )
    if (
        values["http_port"]
        and values["api_key_file"] is None
        and not is_loopback(values["http_bind"])
    ):
        raise ConfigError(
            f"{named['http_bind']} {values['http_bind']} is reachable beyond this machine, and "
            "without a key anyone who reaches it could run models: set EXOD_API_KEY_FILE or "
            "--api-key-file to a file holding a key, or bind 127.0.0.1"
        )
    if values["peer_port"] == values["join_port"]:
        raise ConfigError(
            f"{named['peer_port']} and {named['join_port']} are both {values['peer_port']}: "
            "the peer port (mutual TLS) and the join port (invites) must differ"
        )
    for other in ("peer_port", "join_port"):
        if values["ring_port"] == values[other]:
            raise ConfigError(
                f"{named['ring_port']} and {named[other]} are both {values['ring_port']}: the "
                "ring port of split models must differ from the peer and join ports"
            )
    # Shares of the runner cap are resolved once the cap is known.
    for name in ("prompt_cache_bytes", "mlx_cache_limit"):
        values[name] = values[name].of(values["max_runner_memory"])
    values["model_cache_bytes"] = values["model_cache_bytes"].of(disk_size(values["home"]))
    names = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in names})


def describe(environ: Mapping[str, str] | None = None) -> Sequence[tuple[str, str, str, str]]:
    """(flag, env var, default, help) for each setting, for `exod --help`."""
    env = os.environ if environ is None else environ
    return [(s.flag, s.env, s.default(env) or "-", s.help) for s in SETTINGS]
