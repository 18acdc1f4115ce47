"""The Linux side, rendered (pure): the systemd user unit.

`Type=notify` because exod says READY=1 only once its log is replayed and its socket answers, and
`WatchdogSec` because it pings only while its self-check passes (exod/service/selfcheck.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# systemd restarts exod when it has not pinged for this long: a wedged loop or database.
WATCHDOG_S = 20
RESTART_S = 2
# Longer than exod's drain: it ends each runner (SIGTERM, a grace, SIGKILL) before it exits.
STOP_TIMEOUT_S = 30
EX_CONFIG = 78

_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def _escape(text: str) -> str:
    # `%` starts a specifier in every setting, `$` a variable in ExecStart; both are doubled.
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def exec_arg(arg: str) -> str:
    """One word of ExecStart=, quoted when it needs to be (systemd.service(5): Command lines)."""
    if _PLAIN.fullmatch(arg) and "%" not in arg:
        return arg
    return '"' + _escape(arg).replace("$", "$$") + '"'


def environment_line(name: str, value: str) -> str:
    """One Environment= assignment, quoted whole (systemd.exec(5))."""
    return f'Environment="{_escape(f"{name}={value}")}"'


def environment_of(unit_text: str) -> dict[str, str]:
    """The Environment= assignments of a unit that unit() wrote, undoing environment_line()."""
    found = {}
    for line in unit_text.splitlines():
        if not (line.startswith('Environment="') and line.endswith('"')):
            continue
        quoted, text, i = line[len('Environment="') : -1], [], 0
        while i < len(quoted):
            pair = quoted[i : i + 2]
            if pair[0] == "\\" or pair == "%%":
                text.append(pair[1:])
                i += 2
            else:
                text.append(pair[0])
                i += 1
        name, _, value = "".join(text).partition("=")
        found[name] = value
    return found


def unit(command: Sequence[str], environment: Mapping[str, str]) -> str:
    """The text of exod.service."""
    lines = [
        "# Written by `exoctl service install`; `exoctl service uninstall` removes it.",
        "[Unit]",
        "Description=exod: runs language models for exoctl",
        "",
        "[Service]",
        "Type=notify",
        "ExecStart=" + " ".join(exec_arg(a) for a in command),
        *(environment_line(k, v) for k, v in environment.items()),
        f"WatchdogSec={WATCHDOG_S}",
        "Restart=on-failure",
        f"RestartSec={RESTART_S}",
        # A configuration error stays one until someone fixes it: restarting cannot help.
        f"RestartPreventExitStatus={EX_CONFIG}",
        # SIGTERM to exod alone, which ends its runners in order; whatever is left of the
        # service's processes after TimeoutStopSec gets SIGKILL.
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        # Hands exod its own cgroup subtree, so each runner gets a kernel memory.max at the cap.
        "Delegate=memory",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)
