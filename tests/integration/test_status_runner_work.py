"""`exoctl status` shows what a runner is doing: its batch, its queue, its prompt cache, and the
pid of the process that runs MLX beside its group leader's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil

from tests.daemon import Daemon, read_some, wait_until

TOKENS = 20000  # long enough to be seen running on a busy machine; ended by Ctrl-C


def live_runner(d: Daemon) -> dict[str, Any]:
    runners = [r for r in d.status()["runners"] if r["state"] not in ("stopped", "failed")]
    assert len(runners) == 1, runners
    runner: dict[str, Any] = runners[0]
    return runner


def test_status_shows_the_batch_the_cache_and_the_mlx_pid(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = Daemon.create(tmp_path / "home", EXOD_PARALLEL="2")
    daemon_factory.append(d)
    d.start()
    prompt = "Once upon a time"
    first = d.ok("run", str(qwen2), prompt, "--max-tokens", "8", "--json").json_lines()[-1]
    again = d.ok("run", str(qwen2), prompt, "--max-tokens", "8", "--json").json_lines()[-1]
    # The second run's prompt is the first one's: the cache holds it.
    assert first["cached_tokens"] == 0, first
    assert 0 < again["cached_tokens"] <= again["prompt_tokens"], again

    # Status shows what the cache holds (from the runner's next heartbeat) and its hit rate.
    def shows_the_cache() -> bool:
        runner = live_runner(d)
        size, rate = int(runner["prompt_cache_bytes"]), float(runner["prompt_cache_hit_rate"])
        return size > 0 and 0 < rate <= 1

    assert wait_until(shows_the_cache, timeout=5, poll=0.1), live_runner(d)

    def start(prompt: str) -> subprocess.Popen[bytes]:
        return d.exoctl_bg(
            "run", str(qwen2), prompt, "--max-tokens", str(TOKENS), stdout=subprocess.PIPE
        )

    # Two generate (EXOD_PARALLEL=2); the third, started once they do, waits for a place.
    runs = [start("The quick brown fox"), start("Der schnelle braune Fuchs")]
    for run in runs:
        read_some(run)
    runs.append(start("Events are appended"))
    assert wait_until(lambda: live_runner(d)["active"] == 2, timeout=10, poll=0.1), live_runner(d)
    runner = live_runner(d)
    assert runner["state"] == "running", runner
    # MLX runs in a process of the runner's group other than its leader (the shim).
    assert runner["mlx_pid"] not in (0, runner["pid"]), runner
    assert os.getpgid(runner["mlx_pid"]) == runner["pid"]
    assert "exod.runners.runner" in " ".join(psutil.Process(runner["mlx_pid"]).cmdline())

    table = d.ok("status").text.splitlines()
    header = table[1].split()
    assert header == [
        "ID",
        "MODEL",
        "STATE",
        "PID",
        "MLX_PID",
        "ACTIVE",
        "QUEUED",
        "MEMORY",
        "CACHE",
        "HIT",
    ]
    # Cells are two or more spaces apart; a size ("1.5 GiB") holds a single one.
    row = dict(zip(header, re.split(r" {2,}", table[2]), strict=True))
    assert (row["ID"], row["PID"], row["MLX_PID"]) == (
        runner["id"],
        str(runner["pid"]),
        str(runner["mlx_pid"]),
    )
    assert row["HIT"].endswith("%"), row
    for run in runs:
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=30)
        assert run.returncode == 130, err
