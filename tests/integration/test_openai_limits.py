"""The API answers exod's limits as documented: 503 with Retry-After when the queue is full, 504
when a load times out; every client that is admitted still gets its own correct answer."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

from tests import models
from tests.daemon import Daemon
from tests.httpapi import Answer, http_daemon, open_stream, request
from tests.reference import expected

PROMPT = "Once upon a time"


def start(factory: list[Daemon], home: Path, **env: str) -> tuple[Daemon, int]:
    d, port = http_daemon(home, **env)
    factory.append(d)
    d.start()
    d.ok("models", "add", "qwen", str(models.demo_model("qwen2")))
    return d, port


def test_a_full_queue_is_503_with_retry_after(daemon_factory: list[Daemon], tmp_path: Path) -> None:
    d, port = start(daemon_factory, tmp_path / "home", EXOD_QUEUE_DEPTH="1")
    prompts = [f"{PROMPT} {i}" for i in range(8)]
    barrier = threading.Barrier(len(prompts))

    def one(prompt: str) -> Answer:
        barrier.wait()
        body = {"model": "qwen", "prompt": prompt, "max_tokens": 16}
        return request(port, "POST", "/v1/completions", body)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(one, prompts))
    statuses = [a.status for a in answers]
    # The first run waits for the model to load, and fills the queue of depth 1 meanwhile.
    assert 200 in statuses and 503 in statuses, statuses
    for prompt, answer in zip(prompts, answers, strict=True):
        if answer.status == 503:
            assert answer.error["code"] == "queue_full"
            assert answer.error["type"] == "server_error"
            assert answer.headers["retry-after"] == "2"
        else:
            assert answer.status == 200, answer
            text = answer.json()["choices"][0]["text"]
            assert text == expected(models.demo_model(), prompt, 16).text
    refused = [e for e in d.events() if e["kind"] == "RunAccepted"]
    assert len(refused) == statuses.count(200)  # a refused run never entered the log


def test_a_load_timeout_is_504(daemon_factory: list[Daemon], tmp_path: Path) -> None:
    # Importing MLX alone takes longer than this.
    d, port = start(daemon_factory, tmp_path / "home", EXOD_LOAD_TIMEOUT="0.2", EXOD_KILL_GRACE="1")
    for stream in (False, True):
        body = {"model": "qwen", "prompt": PROMPT, "max_tokens": 4, "stream": stream}
        answer = request(port, "POST", "/v1/completions", body)
        # Streaming too: the status line waits for the first token, so the load's failure
        # still has its own status.
        assert answer.status == 504, answer
        assert answer.error["code"] == "load_timeout"
        assert answer.error["type"] == "server_error"
        assert "retry-after" not in answer.headers
    failed = [e for e in d.events() if e["kind"] == "RunnerFailed"]
    assert failed and {e["reason"] for e in failed} == {"load_timeout"}


def test_stopping_exod_ends_a_stream_with_an_error_event(
    daemon_factory: list[Daemon], tmp_path: Path
) -> None:
    d, port = start(daemon_factory, tmp_path / "home")
    body = {"model": "qwen", "prompt": PROMPT, "max_tokens": 50_000, "stream": True}
    sock, received = open_stream(port, "/v1/completions", body)
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 10
    with sock:
        while chunk := sock.recv(65536):
            received += chunk
    events = [
        line[len(b"data: ") :] for line in received.splitlines() if line.startswith(b"data: ")
    ]
    assert json.loads(events[-1])["error"]["code"] == "daemon_stopped"
    assert b"[DONE]" not in received
