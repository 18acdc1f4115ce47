"""What `exoctl service status` and `logs` found, and what they say about it (pure).

The service is up only when its manager answers, runs it, and the exod answering on the socket
is the one it runs. An exod started by hand serves exoctl just as well, but it is not the
service: it does not come back after a crash or at the next login, and while it holds the home
the service's own exod cannot start. So status names it, with its pid, and exits 69.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from exod.service.holder import Holder
from exod.service.paths import Platform
from exod.service.state import ServiceState

Health = Literal["serving", "not_serving", "unreachable"]


@dataclass(frozen=True)
class Findings:
    platform: Platform
    files: dict[Path, bool]  # each file install writes: does it exist?
    manager_error: str | None  # why the service manager does not answer; None when it does
    state: ServiceState  # what the manager says about exod
    health: Health  # what the exod on the socket says
    home: Path  # the service's (from its installed files), else this shell's
    socket: Path
    holder: Holder | None  # the exod that holds the home
    restart: str  # the command that restarts the service, for advice
    local_network_denied: bool = False

    @property
    def installed(self) -> bool:
        return all(self.files.values())

    @property
    def by_hand(self) -> Holder | None:
        """The exod that holds the home when the service did not start it."""
        return self.holder if self.holder is not None and not self.holder.by_service else None


def who(holder: Holder) -> str:
    return f"exod (pid {holder.pid})" if holder.pid else "an exod"


def stop_it(holder: Holder) -> str:
    return f"stop it (`kill {holder.pid}`)" if holder.pid else "stop it"


def started_by(holder: Holder | None) -> str | None:
    if holder is None:
        return None
    return "service" if holder.by_service else "hand"


def as_json(f: Findings) -> dict[str, object]:
    return {
        "platform": f.platform,
        "installed": f.installed,
        "files": {str(path): ok for path, ok in f.files.items()},
        "manager": {
            "reachable": f.manager_error is None,
            "error": f.manager_error,
            "loaded": f.state.loaded,
            "running": f.state.running,
            "pid": f.state.pid,
            "detail": f.state.detail,
        },
        "exod": f.health,
        "socket": str(f.socket),
        "home": str(f.home),
        "exod_pid": f.holder.pid if f.holder else None,
        "started_by": started_by(f.holder),
        "local_network_denied": f.local_network_denied,
    }


def lines(f: Findings) -> list[str]:
    if f.manager_error is not None:
        said = f"not reachable: {f.manager_error}"
    else:
        said = f.state.detail + (f", pid {f.state.pid}" if f.state.pid else "")
    files = ", ".join(f"{p}{'' if ok else ' (missing)'}" for p, ok in f.files.items())
    exod = f"{f.health.replace('_', ' ')} on {f.socket}"
    if f.holder is not None:
        pid = f", pid {f.holder.pid}" if f.holder.pid else ""
        exod += f"{pid}, started by {'the service' if f.holder.by_service else 'hand'}"
    return [
        f"platform  {f.platform}",
        f"installed {'yes' if f.installed else 'no'}: {files}",
        f"manager   {said}",
        f"exod      {exod}",
        f"home      {f.home}",
    ]


NOT_INSTALLED = (
    "exod is not running and is not installed as a service",
    "start it with `exoctl service install`, or `exod` in the foreground",
)


def problem(f: Findings) -> tuple[str, str] | None:
    """(what is wrong, what to do) when the service is not up; None when it is."""
    if f.health == "not_serving":
        where = "its stderr" if f.by_hand else "`exoctl service logs`"
        return "exod answers but fails its self-check", f"{where} says why"
    if f.manager_error is not None:
        return _without_manager(f, f"no user service manager answers ({f.manager_error})")
    if f.by_hand is not None:
        return _by_hand(f, f.by_hand)
    if f.health == "serving":
        # Up, unless the exod answering uses another home and the service is not running.
        return (
            None
            if f.state.running
            else (
                f"an exod answers on {f.socket}, but the service is not running ({f.state.detail})",
                "stop that exod, then `exoctl service install`",
            )
        )
    if not f.installed:
        return NOT_INSTALLED
    return "the service is installed but exod does not answer", "`exoctl service logs` says why"


def _without_manager(f: Findings, no_manager: str) -> tuple[str, str]:
    if f.by_hand is not None:
        return (
            f"{no_manager}, so exod does not run as a service; {who(f.by_hand)} on {f.home} "
            "was started by hand",
            "it serves exoctl as it is, but nothing restarts it; for a service, install where "
            "a user service manager runs (docs/install.md)",
        )
    if f.health == "serving":
        return (
            f"{no_manager}, so the exod answering on {f.socket} is not the service",
            "for a service, install where a user service manager runs (docs/install.md)",
        )
    if f.installed:
        return (
            f"the service is installed, but {no_manager}, so exod is not running",
            "run exod by hand (`exod`), or see docs/install.md",
        )
    return (
        f"exod is not running and is not installed as a service, and {no_manager}",
        "run exod by hand (`exod`, in the foreground); for a service, see docs/install.md",
    )


def _by_hand(f: Findings, hand: Holder) -> tuple[str, str]:
    if f.installed:
        return (
            f"{who(hand)}, started by hand, holds {f.home}, so the service's exod cannot start",
            f"{stop_it(hand)}, then `{f.restart}`",
        )
    return (
        f"{who(hand)} runs on {f.home}, started by hand; exod is not installed as a service",
        f"to run it as one, {stop_it(hand)} and run `exoctl service install`",
    )


def logs_problem(manager_error: str, home: Path, holder: Holder | None) -> tuple[str, str]:
    """(what is wrong, what to do) for `logs` where no user service manager answers: there is
    no service log, so say where exod's log is instead."""
    runners = f"its runners log to {home / 'runners'}"
    if holder is not None and not holder.by_service:
        where = f"{who(holder)} was started by hand and logs to its own stderr; {runners}"
    else:
        where = f"an exod started by hand logs to its own stderr; {runners}"
    return f"no user service manager answers ({manager_error}), so there is no service log", where
