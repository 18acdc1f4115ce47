"""The real exod keeps the machine awake while a run is in flight, as far as this machine lets
it: with logind it holds a systemd-inhibit lock as its child and lets it go once idle; without
logind (a container) it says so once and does not try again for every run; with
EXOD_KEEP_AWAKE=0 or no systemd-inhibit it does nothing at all."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from exod.service import awake
from tests.daemon import Daemon, wait_until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the hold checked here is Linux's"
)

KEEPING = re.compile(r"keeping this machine awake while it serves \(systemd-inhibit, pid (\d+)\)")
RELEASED = "no longer keeping this machine awake: nothing to serve"
CANNOT = "cannot keep this machine awake while it serves (systemd-inhibit ended with status"


def logind_answers() -> bool | None:
    """None: no systemd-inhibit here; else whether it can take a lock (logind answers)."""
    tool = shutil.which("systemd-inhibit")
    if tool is None:
        return None
    probe = subprocess.run(
        [tool, "--what=idle:sleep", "--who=exod tests", "--why=probe", "--mode=block", "true"],
        capture_output=True,
        check=False,
        timeout=10,
    )
    return probe.returncode == 0


def holds_of(d: Daemon) -> list[psutil.Process]:
    """exod's children that hold the machine awake."""
    children = psutil.Process(d.pid).children()
    return [c for c in children if c.name() in ("systemd-inhibit", "caffeinate")]


def run_once(d: Daemon, model: Path) -> None:
    d.ok("run", str(model), "hello", "--max-tokens", "4")


def test_a_run_holds_the_machine_awake_as_far_as_it_can(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    answers = logind_answers()
    d = Daemon.create(tmp_path / "home")
    daemon_factory.append(d)
    d.start()
    run_once(d, qwen2)
    settle = awake.CHECK_AFTER_S + 1.0
    if answers is None:
        time.sleep(settle)
        assert "awake" not in d.log()
        return
    if not answers:  # a container: systemd-inhibit exits at once
        assert wait_until(lambda: CANNOT in d.log(), timeout=settle + 5), d.log()[-2000:]
        assert "Failed to connect to bus" in d.log()
        run_once(d, qwen2)  # not tried again
        time.sleep(settle)
        assert d.log().count("cannot keep this machine awake") == 1
        assert not KEEPING.search(d.log())
        assert not holds_of(d)
        return
    assert wait_until(lambda: KEEPING.search(d.log()) is not None, timeout=settle + 5), d.log()
    found = KEEPING.search(d.log())
    assert found is not None
    hold = int(found.group(1))
    assert [p.pid for p in holds_of(d)] == [hold]  # exod's own child
    deadline = awake.RELEASE_AFTER_S + 5
    assert wait_until(lambda: RELEASED in d.log(), timeout=deadline), d.log()[-2000:]
    assert not psutil.pid_exists(hold) or psutil.Process(hold).ppid() != d.pid


def test_keep_awake_off_holds_nothing(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = Daemon.create(tmp_path / "home", EXOD_KEEP_AWAKE="0")
    daemon_factory.append(d)
    d.start()
    run_once(d, qwen2)
    time.sleep(awake.CHECK_AFTER_S + 1.0)
    assert "awake" not in d.log()
    assert not holds_of(d)
