"""Every setting of exod in one place: its flag, its environment variable, its default.

Precedence: flag, then environment, then default. `exod --help` prints this table. A value that
does not parse or is out of range raises ConfigError, which exod turns into exit 78 so that a
service manager does not restart-loop on a configuration mistake.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Linux allows 108 bytes in sun_path including the NUL, macOS 104; take the smaller everywhere.
MAX_SOCKET_PATH = 103


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


def default_home(environ: Mapping[str, str], platform: str = sys.platform) -> Path:
    """The platform's state dir for exod (DESIGN.md: Data)."""
    home = Path(environ.get("HOME") or Path.home())
    if platform == "darwin":
        return home / "Library" / "Application Support" / "exod"
    state = environ.get("XDG_STATE_HOME")
    base = Path(state) if state else home / ".local" / "state"
    return base / "exod"


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a non-negative number of seconds")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of debug, info, warning, error")
    return level


def _path(text: str) -> Path:
    if not text:
        raise ValueError("must not be empty")
    return Path(text).expanduser().absolute()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "home",
        "EXOD_HOME",
        lambda env: str(default_home(env)),
        _path,
        "state dir: the event log, node id, runner logs, models",
    ),
    Setting(
        "socket",
        "EXOD_SOCKET",
        lambda env: "",  # filled in from home below
        lambda t: _path(t) if t else None,
        "control socket (default: exod.sock in the state dir)",
    ),
    Setting(
        "idle_ttl",
        "EXOD_IDLE_TTL",
        lambda env: "300",
        _seconds,
        "seconds an idle runner keeps its model loaded",
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
        "snapshot_every",
        "EXOD_SNAPSHOT_EVERY",
        lambda env: "500",
        _positive_int,
        "events between snapshots of the folded state",
    ),
)


def load(flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (by setting name; None when not given), the environment and defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        flag = flags.get(s.name)
        raw = flag if flag is not None else env.get(s.env, s.default(env))
        try:
            values[s.name] = s.parse(raw)
        except ValueError as e:
            source = s.flag if flag is not None else s.env if s.env in env else "default"
            raise ConfigError(f"invalid {s.env} ({source}) {raw!r}: {e}") from None
    if values["socket"] is None:
        values["socket"] = values["home"] / "exod.sock"
    if len(os.fsencode(values["socket"])) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket path {values['socket']} is longer than {MAX_SOCKET_PATH} bytes, "
            "the limit of a Unix socket: set EXOD_SOCKET (or --socket) to a shorter path"
        )
    names = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in names})


def describe(environ: Mapping[str, str] | None = None) -> Sequence[tuple[str, str, str, str]]:
    """(flag, env var, default, help) for each setting, for `exod --help`."""
    env = os.environ if environ is None else environ
    return [(s.flag, s.env, s.default(env) or "-", s.help) for s in SETTINGS]
