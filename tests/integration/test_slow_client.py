"""A stopped client holds up nobody: not the other clients, not its own run in the runner.

What a runner sends for a run waits in an unbounded queue in exod until the client reads it, and
whatever has piled up is sent as one chunk (exod/runs.py); so a client that stops reading (here
SIGSTOP, as a laptop lid or a debugger would) neither stalls the batch nor trips the decode stall
limit, and gets its whole text when it reads again.

Meaningful with batching (EXOD_PARALLEL > 1: the others decode beside the stopped run) and
without it (runs queue: the stopped client's run is the one generating, and the others can only
start once the runner has finished it, which it must do without the client).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon, Result, read_some
from tests.reference import expected

TOKENS = 1500  # long enough that the stopped run is still generating when the others start
STALL_S = 3  # EXOD_DECODE_STALL_TIMEOUT: the client stays stopped for longer than this
STOP_S = 8.0
VICTIM_PROMPT = "Once upon a time"
OTHER_PROMPTS = ["The quick brown fox", "Der schnelle braune Fuchs", "Events are appended"]


def finish(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> Result:
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, err.decode(errors="replace"))


@pytest.mark.timeout(300)
def test_a_stopped_client_holds_up_nobody_and_gets_its_whole_text(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = Daemon.create(
        tmp_path / "home",
        EXOD_PARALLEL=str(1 + len(OTHER_PROMPTS)),
        EXOD_DECODE_STALL_TIMEOUT=str(STALL_S),
    )
    daemon_factory.append(d)
    d.start()
    d.ok("run", str(qwen2), "warm up", "--max-tokens", "1")  # loaded: decoding starts at once

    victim = d.exoctl_bg("run", str(qwen2), VICTIM_PROMPT, "--max-tokens", str(TOKENS))
    head = read_some(victim)  # its run generates now
    os.kill(victim.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        others = [
            d.exoctl_bg("run", str(qwen2), p, "--max-tokens", str(TOKENS)) for p in OTHER_PROMPTS
        ]
        # Every other client gets its whole text while the stopped one reads nothing.
        results = [finish(c) for c in others]
        assert victim.poll() is None, "the stopped client ended"
        time.sleep(max(0.0, STOP_S - (time.monotonic() - stopped_at)))
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    for prompt, result in zip(OTHER_PROMPTS, results, strict=True):
        assert (result.code, result.stderr) == (0, ""), (prompt, result)
        assert result.stdout == expected(qwen2, prompt, TOKENS, chat=True).stdout, prompt

    resumed = finish(victim)
    resumed.stdout = head + resumed.stdout
    assert (resumed.code, resumed.stderr) == (0, ""), resumed
    assert resumed.stdout == expected(qwen2, VICTIM_PROMPT, TOKENS, chat=True).stdout

    events = d.events()
    assert [e for e in events if e["kind"] == "RunnerFailed"] == []
    finished = [e for e in events if e["kind"] == "RunFinished"]
    assert len(finished) == 2 + len(OTHER_PROMPTS), finished
    assert {e["stop_reason"] for e in finished} <= {"length", "stop"}, finished
