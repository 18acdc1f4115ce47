"""The README's commands, run as written by a new user: a fresh HOME, nothing else set up."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from tests.daemon import pids_alive, wait_until

ROOT = Path(__file__).resolve().parents[2]


def sh_blocks(section: str) -> list[str]:
    """The ```sh blocks under the README's `## section` heading."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, flags=re.DOTALL)


def fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXOD_", "XDG_"))}
    # The README leaves the HTTP API on its default port; a developer's own exod may hold it.
    return {**env, "HOME": str(home), "EXOD_HTTP_PORT": "0"}


def commands(block: str) -> list[str]:
    lines = (line.split("  #", 1)[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def test_quick_start_is_two_commands_and_the_demo_runs(tmp_path: Path) -> None:
    (block,) = sh_blocks("Quick start")
    assert commands(block) == ["./dev demo", "./dev test"]
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        ["./dev", "demo"],
        cwd=ROOT,
        env=fresh_env(home),
        capture_output=True,
        timeout=300,
        check=False,
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert proc.stdout.strip(), "the demo generated no text"
    assert "demo: exod stopped (exit 0)" in stderr
    assert "Traceback" not in stderr


def test_using_it_runs_as_written(tmp_path: Path) -> None:
    block = sh_blocks("Using it")[0]
    home, clone = tmp_path / "home", tmp_path / "clone"
    home.mkdir()
    clone.mkdir()
    # The clone's venv, as `./dev setup` made it, and its tools (the real model's cache is theirs).
    (clone / ".venv").symlink_to(ROOT / ".venv")
    (clone / "tools").symlink_to(ROOT / "tools")
    proc = subprocess.run(
        ["bash", "-e", "-c", block],
        cwd=clone,
        env=fresh_env(home),
        capture_output=True,
        timeout=300,
        check=False,
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    # exod's log is in its file, not between exoctl's lines.
    log = (clone / "exod.log").read_text()
    assert "INFO" in log, log
    assert "INFO" not in stderr, stderr
    assert "Traceback" not in stderr + log
    # The --json run ended with its `done` line; the runners were gone before exod was.
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith(b"{")]
    assert [r["type"] for r in records][-1] == "done", records
    # `kill %1` stopped exod, and exod exited cleanly.
    (pid,) = {int(p) for p in re.findall(r"exod\[(\d+)\]", log)}
    assert wait_until(lambda: not pids_alive([pid]), timeout=30), "exod still runs"
