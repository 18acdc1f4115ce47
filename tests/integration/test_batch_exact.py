"""Batching changes no text: eight runs at once over gRPC and HTTP together, on one runner of a
real exod, each get exactly the text they get alone (mlx_lm.generate's); a seeded sampled run
gives the same text alone and beside seven other sampled runs; a run cancelled mid-batch leaves
the others exact."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests import models
from tests.daemon import Daemon, read_some, wait_until
from tests.faults import LONG
from tests.httpapi import client, http_daemon
from tests.reference import expected

# Different prompts and lengths, so that runs join and leave the batch at different steps.
PROMPTS = [
    ("Once upon a time", 24),
    ("The sea is salty because", 9),
    ("In a village far away there lived", 31),
    ("Rain", 17),
    ("Why do cats sleep so much? Because", 12),
    ("A list of fruits: apples, pears,", 28),
    ("The capital of France", 5),
    ("Tell me a story about a dragon who", 20),
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    d, port = http_daemon(tmp_path_factory.mktemp("batch") / "home", EXOD_PARALLEL="8")
    try:
        d.start()
        d.ok("models", "add", "qwen", str(models.demo_model("qwen2")))
        d.ok("run", "qwen", "Hi", "--max-tokens", "1")  # loaded: every run below is batched
        yield d, port
    finally:
        assert not d.cleanup(), "runners outlived exod"


def over_http(port: int, prompt: str, max_tokens: int, out: dict[str, str]) -> None:
    reply = client(port).completions.create(
        model="qwen", prompt=prompt, max_tokens=max_tokens, temperature=0
    )
    out[prompt] = reply.choices[0].text


def cli(d: Daemon, prompt: str, max_tokens: int, *args: str) -> subprocess.Popen[bytes]:
    return d.exoctl_bg("run", "qwen", prompt, "--raw", "--max-tokens", str(max_tokens), *args)


def finish(proc: subprocess.Popen[bytes]) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.endswith(b"\n")
    return out[:-1].decode()


def test_eight_runs_at_once_over_grpc_and_http_each_get_their_text_alone(
    api: tuple[Daemon, int],
) -> None:
    d, port = api
    since = d.last_seq()
    # The runner is held while the eight arrive (each client takes a moment to start), so that
    # all eight are in its batch together, whatever the machine's load: it reads them all
    # before its next step.
    (runner,) = [r for r in d.status()["runners"] if r["state"] in {"ready", "running"}]
    os.kill(runner["mlx_pid"], signal.SIGSTOP)
    try:
        over_grpc = [(p, cli(d, p, n)) for p, n in PROMPTS[:4]]
        http: dict[str, str] = {}
        threads = [
            threading.Thread(target=over_http, args=(port, p, n, http)) for p, n in PROMPTS[4:]
        ]
        for t in threads:
            t.start()
        assert wait_until(lambda: active(d) == 8, timeout=60), d.status()["runners"]
    finally:
        os.kill(runner["mlx_pid"], signal.SIGCONT)
    texts = {p: finish(proc) for p, proc in over_grpc}
    for t in threads:
        t.join(timeout=120)
    texts.update(http)
    model = models.demo_model("qwen2")
    for prompt, max_tokens in PROMPTS:
        assert texts[prompt] == expected(model, prompt, max_tokens).text, prompt
    # They ran together, on one runner: at some moment, several were in its batch at once.
    events = [e for e in d.events(since) if e["kind"] in {"RunAccepted", "RunFinished"}]
    assert len({e["runner_id"] for e in events if e["kind"] == "RunAccepted"}) == 1
    assert max_in_flight(events) == 8, events


def active(d: Daemon) -> int:
    return sum(r["active"] for r in d.status()["runners"])


def max_in_flight(events: list[dict[str, object]]) -> int:
    """The most runs accepted and not yet finished at once, walking the log in order."""
    now = most = 0
    for e in events:
        now += 1 if e["kind"] == "RunAccepted" else -1
        most = max(most, now)
    return most


def test_a_seeded_run_samples_the_same_alone_and_in_a_sampled_batch(
    api: tuple[Daemon, int],
) -> None:
    d, _ = api
    seeded = ("--temperature", "1.3", "--seed", "7")
    alone = finish(cli(d, "Once upon a time", 24, *seeded))
    others = [cli(d, p, n, "--temperature", "1.0") for p, n in PROMPTS[1:]]
    beside = cli(d, "Once upon a time", 24, *seeded)
    assert finish(beside) == alone
    for proc in others:
        finish(proc)
    # The seed mattered: a sampled text, not the greedy one.
    assert alone != expected(models.demo_model("qwen2"), "Once upon a time", 24).text


def test_a_run_cancelled_mid_batch_leaves_the_others_exact(api: tuple[Daemon, int]) -> None:
    d, _ = api
    victim = cli(d, "Ramble on forever about", int(LONG))
    read_some(victim)  # it is decoding
    others = [(p, n, cli(d, p, n)) for p, n in PROMPTS[:6]]
    victim.send_signal(signal.SIGINT)
    assert victim.wait(timeout=10) == 130
    model = models.demo_model("qwen2")
    for prompt, max_tokens, proc in others:
        assert finish(proc) == expected(model, prompt, max_tokens).text, prompt
