"""What the service manager says about the service, parsed (pure) from `systemctl --user show`
and `launchctl print`."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceState:
    loaded: bool  # the manager knows the service
    running: bool
    pid: int | None
    detail: str  # the manager's own words, for people


def from_systemctl_show(text: str) -> ServiceState:
    """From `systemctl --user show exod.service --property=...` (KEY=value lines)."""
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    active, sub = props.get("ActiveState", "unknown"), props.get("SubState", "unknown")
    pid = int(props.get("MainPID") or 0)
    detail = f"{active} ({sub})"
    status = props.get("ExecMainStatus", "0")
    if active == "failed" and status != "0":
        detail += f", last exit status {status}"
    return ServiceState(
        loaded=props.get("LoadState") == "loaded",
        running=active in ("active", "reloading", "deactivating"),
        pid=pid or None,
        detail=detail,
    )


# `launchctl print` shows the job's own properties one tab in, as `key = value`.
_LAUNCHCTL_PROPERTY = re.compile(r"^\t([a-z][a-z ]*?) = (.*)$")


def from_launchctl_print(text: str) -> ServiceState:
    """From `launchctl print gui/UID/LABEL`: its state, pid and last exit code."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        match = _LAUNCHCTL_PROPERTY.match(line)
        if match:
            props.setdefault(match[1], match[2].strip())
    state = props.get("state", "unknown")
    pid = props.get("pid", "")
    detail = f"{state}, last exit code {props.get('last exit code', 'unknown')}"
    return ServiceState(
        loaded=True,
        running=state == "running",
        pid=int(pid) if pid.isdigit() else None,
        detail=detail,
    )


NOT_LOADED = ServiceState(loaded=False, running=False, pid=None, detail="not loaded")
