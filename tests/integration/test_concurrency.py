"""Concurrent runs on one model: each gets its own full text, or 75 when the queue is full."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from exod.proto.exo.v1 import control_pb2, control_pb2_grpc
from tests.daemon import Daemon, Result, read_some
from tests.reference import expected

PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "Der schnelle braune Fuchs",
    "Где мой чай?",
    "你好，世界",  # noqa: RUF001  # Chinese punctuation on purpose
    "Events are appended to the log",
]


def finish(proc: subprocess.Popen[bytes], timeout: float = 90.0) -> Result:
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, err.decode(errors="replace"))


def test_six_concurrent_runs_each_get_their_own_full_text(exod: Daemon, qwen2: Path) -> None:
    # Started together on a model that is not loaded yet: all wait for one load, then take turns.
    clients = [exod.exoctl_bg("run", str(qwen2), p, "--max-tokens", "40") for p in PROMPTS]
    results = [finish(c) for c in clients]
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.code == 0, (prompt, result)
        assert result.stdout == expected(qwen2, prompt, 40, chat=True).stdout, prompt
    events = exod.events()
    assert [e["kind"] for e in events].count("RunnerSpawned") == 1
    assert [e["kind"] for e in events].count("RunAccepted") == len(PROMPTS)


def test_requests_arriving_at_once_for_a_cold_model_share_one_runner(
    exod: Daemon, llama: Path
) -> None:
    """Calls released together (no exoctl start-up to spread them out) still load one runner.

    A race shows only sometimes, so the model is made cold and the burst repeated a few times.
    """
    # Warm exod's admission (it reads the model's tokenizer once) with a request it refuses
    # before spawning, so that the calls below reach the supervisor as close together as they
    # were sent.
    refused = exod.exoctl("run", str(llama), "word " * 3000, "--raw")
    assert refused.code == 64, refused
    want = [expected(llama, p, 8, chat=True).text for p in PROMPTS]
    for burst in range(1, 4):
        start = threading.Barrier(len(PROMPTS))

        def run(prompt: str, start: threading.Barrier = start) -> str:
            with grpc.insecure_channel(f"unix:{exod.socket}") as channel:
                stub = control_pb2_grpc.ControlStub(channel)
                grpc.channel_ready_future(channel).result(timeout=10)
                request = control_pb2.RunRequest(model=str(llama), prompt=prompt, max_tokens=8)
                start.wait(timeout=10)
                return "".join(reply.tokens.text for reply in stub.Run(request, timeout=60))

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(run, PROMPTS)) == want
        assert [e["kind"] for e in exod.events()].count("RunnerSpawned") == burst
        assert exod.exoctl("kill", "--all").code == 0  # cold again


def test_full_queue_refuses_with_75_and_the_rest_run(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    # One generation at a time, so that runs wait in the queue (a batch would take them in).
    d = Daemon.create(tmp_path / "home", EXOD_QUEUE_DEPTH="1", EXOD_PARALLEL="1")
    daemon_factory.append(d)
    d.start()
    long_prompt, long_tokens = PROMPTS[0], 1000
    # One long run occupies the runner; while it generates, one more run may wait, no more.
    first = d.exoctl_bg("run", str(qwen2), long_prompt, "--max-tokens", str(long_tokens))
    head = read_some(first)
    others = [d.exoctl_bg("run", str(qwen2), p, "--max-tokens", "40") for p in PROMPTS[1:]]
    results = [finish(c) for c in others]
    first_result = finish(first)
    first_result.stdout = head + first_result.stdout
    assert first_result.code == 0, first_result
    assert first_result.stdout == expected(qwen2, long_prompt, long_tokens, chat=True).stdout

    refused = [r for r in results if r.code == 75]
    assert refused, "no run was refused"
    assert len(refused) < len(results), "every waiting run was refused"
    for prompt, result in zip(PROMPTS[1:], results, strict=True):
        if result.code == 75:
            assert "EXOD_QUEUE_DEPTH=1" in result.stderr, result
            assert result.stdout == b""
        else:
            assert result.code == 0, (prompt, result)
            assert result.stdout == expected(qwen2, prompt, 40, chat=True).stdout, prompt
    accepted = [e for e in d.events() if e["kind"] == "RunAccepted"]
    assert len(accepted) == 1 + len(results) - len(refused)
