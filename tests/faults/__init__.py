"""Fault injection for the integration tests: the wrapper script, a runner's processes, signals.

A runner is a process group: the shim (its leader, whose pid `exoctl status` shows and which is
the group id), the runner under it, and whatever those start (here, the wrapper's `sleep`). The
helpers find a group from outside, as an operator would, by the shim's environment, so that a
fault can be injected at a precise moment without asking exod.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests import models
from tests.daemon import Daemon, Event, group_alive

WRAPPER = Path(__file__).with_name("wrapper.sh")
LONG = "20000"  # max tokens of a generation that a fault will cut short (minutes of decoding)
PROMPT = "Once upon a time"


def arm_wrapper(d: Daemon, fault: str) -> None:
    """Make the next runner's wrapper do `fault` (see wrapper.sh) instead of starting it."""
    (d.home / "wrapper-fault").write_text(fault + "\n")


def wrapper_children(d: Daemon) -> list[int]:
    """Pids of every `sleep` a wrapper of this daemon started."""
    path = d.home / "wrapper-children"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def of_kind(events: list[Event], kind: str, **fields: object) -> list[Event]:
    return [e for e in events if e["kind"] == kind and all(e[k] == v for k, v in fields.items())]


def is_runner(cmdline: list[str]) -> bool:
    """The runner itself: python -m exod.runners.runner (not the shim, not a wrapper shell)."""
    return (
        bool(cmdline)
        and Path(cmdline[0]).name.startswith("python")
        and (cmdline[1:3] == ["-m", "exod.runners.runner"])
    )


@dataclass(frozen=True)
class Group:
    """One runner's process group, seen from outside."""

    runner_id: str
    pgid: int

    def members(self) -> list[int]:
        return group_alive(self.pgid)

    def runner_pid(self) -> int | None:
        for pid in self.members():
            try:
                if is_runner(psutil.Process(pid).cmdline()):
                    return pid
            except psutil.NoSuchProcess:
                continue
        return None

    def wait_runner_pid(self, timeout: float = 30.0) -> int:
        """The runner's pid, once the shim (and wrapper) have started it."""
        deadline = time.monotonic() + timeout
        while (pid := self.runner_pid()) is None:
            assert time.monotonic() < deadline, f"no runner process in group {self.pgid}"
            time.sleep(0.01)
        return pid

    def kill(self, sig: signal.Signals) -> None:
        os.killpg(self.pgid, sig)

    def kill_runner(self, sig: signal.Signals) -> None:
        pid = self.runner_pid()
        assert pid is not None, f"no runner process in group {self.pgid}"
        os.kill(pid, sig)

    def wait_gone(self, since: float, timeout: float) -> float:
        """Seconds from `since` (a time.monotonic()) until no process of the group is left."""
        deadline = time.monotonic() + timeout
        while self.members():
            assert time.monotonic() < deadline, (
                f"group {self.pgid} still has {self.members()} {timeout}s on"
            )
            time.sleep(0.02)
        return time.monotonic() - since


def shims(d: Daemon) -> dict[str, int]:
    """runner id -> shim pid, for every live shim of this daemon."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        try:
            cmd = proc.info["cmdline"] or []
            env = proc.info["environ"] or {}
            if (
                "exod.runners.shim" in cmd
                and env.get("EXOD_HOME") == str(d.home)
                and proc.info["status"] != psutil.STATUS_ZOMBIE
            ):
                found[env["EXOD_RUNNER_ID"]] = proc.info["pid"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def next_group(d: Daemon, known: set[str] | None = None, timeout: float = 30.0) -> Group:
    """The group of the first runner of this daemon not in `known` (default: any live now)."""
    deadline = time.monotonic() + timeout
    while True:
        new = {k: v for k, v in shims(d).items() if k not in (known or set())}
        if new:
            ((runner_id, pid),) = new.items()
            return Group(runner_id, pid)
        assert time.monotonic() < deadline, f"exod spawned no runner within {timeout}s"
        time.sleep(0.01)


def runner_status(d: Daemon, runner_id: str) -> dict[str, Any]:
    (runner,) = [r for r in d.status()["runners"] if r["id"] == runner_id]
    assert isinstance(runner, dict)
    return runner


def wait_state(
    d: Daemon,
    runner_id: str,
    check: Callable[[dict[str, Any]], bool],
    client: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until the runner's status passes `check`; a client that ended meanwhile (it could
    never get there) fails at once, with what it said."""
    deadline = time.monotonic() + 30
    while not check(shown := runner_status(d, runner_id)):
        if client is not None and client.poll() is not None:
            out, err = client.communicate()
            raise AssertionError(f"client ended with {client.returncode}: {out!r} {err!r}")
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)


def ready_group(d: Daemon, model: Path) -> Group:
    """A loaded, idle runner of `model` (one short run loads it)."""
    known = set(shims(d))
    result = d.exoctl("run", str(model), PROMPT, "--max-tokens", "1")
    assert result.code == 0, result
    return next_group(d, known, timeout=1)


def client_outcome(
    client: subprocess.Popen[bytes], head: bytes = b"", timeout: float = 60
) -> tuple[int, list[Any]]:
    """(exit code, JSON lines) of `exoctl run --json` started with Daemon.exoctl_bg, once it
    ends; `head` is what the test read from its stdout already."""
    out, _ = client.communicate(timeout=timeout)
    return client.returncode, [json.loads(line) for line in (head + out).decode().splitlines()]


def big_model() -> Path:
    """A qwen2 demo model with about 360 MiB of weights: it takes seconds to load."""
    return models.demo_model("qwen2", hidden_size=1024, num_layers=6, intermediate_size=4096)


def huge_model() -> Path:
    """A qwen2 demo model with about 1 GiB of weights."""
    return models.demo_model("qwen2", hidden_size=1024, num_layers=17, intermediate_size=4096)
