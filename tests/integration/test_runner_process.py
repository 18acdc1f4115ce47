"""The real runner subprocess over a real socket pair, loading demo models with real MLX.

The test plays the daemon: it spawns `python -m exod.runners.runner`, speaks the pipe protocol,
and compares what the runner streams with mlx_lm.generate run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import psutil
import pytest

from exod import RUNNER_PROTOCOL_VERSION
from exod.models.demo import Arch
from exod.proto.exo.v1 import runner_pb2
from exod.runners.pipe import read_message_sync, write_message_sync
from tests import models
from tests.runner_pipe import Runner

NON_ASCII_PROMPT = "Grüße aus München — 東京 🦊 ça va?"
LONG_DECODE = 100_000  # tokens; far more than a test waits for, so only Cancel ends it


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.close()


@cache
def _reference(path: Path) -> tuple[Any, Any]:
    import mlx_lm  # MLX in this process only for the reference output

    loaded = mlx_lm.load(str(path))  # (model, tokenizer), typed as maybe with a config too
    return loaded[0], loaded[1]


def _generate_reference(path: Path, prompt: str | list[int], **kwargs: Any) -> str:
    import mlx_lm

    model, tokenizer = _reference(path)
    return str(mlx_lm.generate(model, tokenizer, prompt, **kwargs))


# Per architecture: one loaded runner shared by the generation tests. llama is made without a
# chat template, so that a non-raw request there shows the raw fallback.
MODELS: dict[str, dict[str, Any]] = {
    "qwen2": {"num_layers": 3},
    "llama": {"num_layers": 2, "chat_template": False},
}


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def loaded(request: pytest.FixtureRequest) -> Iterator[tuple[Runner, Path]]:
    arch: Arch = request.param
    path = models.demo_model(arch, **MODELS[arch])
    r = Runner()
    r.hello()
    end = r.load(path)
    assert end.WhichOneof("msg") == "ready", end
    yield r, path
    r.close()


def test_handshake_reports_the_protocol_and_versions(runner: Runner) -> None:
    reply = runner.hello()
    assert reply.protocol_version == RUNNER_PROTOCOL_VERSION
    assert reply.pid == runner.proc.pid
    assert reply.mlx_version.startswith("0.")
    assert reply.mlx_lm_version.startswith("0.")


def test_protocol_mismatch_is_refused_with_exit_70(runner: Runner) -> None:
    runner.send(hello=runner_pb2.Hello(protocol_version=RUNNER_PROTOCOL_VERSION + 1))
    msg = runner.recv()
    assert msg.WhichOneof("msg") == "error"
    assert msg.error.reason == "internal"
    assert str(RUNNER_PROTOCOL_VERSION + 1) in msg.error.message
    assert runner.wait(10) == 70


def test_load_reports_phases_in_order_then_ready(loaded: tuple[Runner, Path]) -> None:
    r, path = loaded
    layers = MODELS[path.name.split("-")[0]]["num_layers"]
    phases = [(p.phase, p.current, p.total) for p in r.progress]
    assert phases == [
        ("started", 0, 0),
        ("imported", 0, 0),
        *[("weights", i, layers) for i in range(1, layers + 1)],
        ("tokenizer", 0, 0),
    ]
    assert r.ready is not None
    assert r.ready.context_length == 2048
    assert r.ready.has_chat_template == (path.name.startswith("qwen2"))
    assert r.ready.load_s > 0
    # K and V, per layer, per KV head, per head dimension, float32: the demo model's KV cache.
    config = json.loads((path / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * layers * config["num_key_value_heads"] * head_dim * 4
    assert r.ready.kv_bytes_per_token == per_token


def test_raw_generation_is_exactly_mlx_lm_generate(loaded: tuple[Runner, Path]) -> None:
    r, path = loaded
    text, msgs = r.generate(prompt=NON_ASCII_PROMPT, raw=True)
    expected = _generate_reference(path, NON_ASCII_PROMPT, max_tokens=40)
    assert text == expected
    assert text.strip()

    done = msgs[-1].done
    _, tokenizer = _reference(path)
    assert done.request_id == "r"
    assert done.stop_reason == "length"
    assert done.generation_tokens == 40
    assert done.prompt_tokens == len(tokenizer.encode(NON_ASCII_PROMPT))
    assert done.ttft_s > 0
    assert done.tokens_per_s > 0
    counts = sum(m.tokens.count for m in msgs if m.WhichOneof("msg") == "tokens")
    assert 0 < counts <= done.generation_tokens
    prefill = [m.progress for m in msgs if m.WhichOneof("msg") == "progress"]
    assert prefill and all(p.phase == "prefill" and p.request_id == "r" for p in prefill)
    assert prefill[-1].current == prefill[-1].total == done.prompt_tokens


def test_chat_generation_is_generate_on_the_templated_prompt(loaded: tuple[Runner, Path]) -> None:
    r, path = loaded
    text, _ = r.generate(prompt=NON_ASCII_PROMPT, raw=False)
    _, tokenizer = _reference(path)
    if tokenizer.has_chat_template:
        messages = [{"role": "user", "content": NON_ASCII_PROMPT}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert isinstance(prompt, list)
    else:
        prompt = NON_ASCII_PROMPT  # no template: the prompt goes in as it is
    assert text == _generate_reference(path, prompt, max_tokens=40)


def test_seeded_sampling_is_reproducible_and_matches_mlx_lm(loaded: tuple[Runner, Path]) -> None:
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    r, path = loaded
    first, _ = r.generate(prompt="Once upon a time", raw=True, temperature=1.5, has_seed=True)
    second, _ = r.generate(prompt="Once upon a time", raw=True, temperature=1.5, has_seed=True)
    assert first == second
    mx.random.seed(0)
    sampler = make_sampler(temp=1.5)
    assert first == _generate_reference(path, "Once upon a time", max_tokens=40, sampler=sampler)


@pytest.mark.parametrize(
    ("prompt", "limit", "reason"),
    [("", 0, "prompt_empty"), (NON_ASCII_PROMPT, 3, "prompt_too_long")],
)
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "chat"])
def test_refused_prompt_leaves_the_runner_serving(
    loaded: tuple[Runner, Path], prompt: str, limit: int, reason: str, raw: bool
) -> None:
    r, _ = loaded
    _, msgs = r.generate(prompt=prompt, raw=raw, max_prompt_tokens=limit)
    assert [m.WhichOneof("msg") for m in msgs] == ["error"]
    assert msgs[0].error.reason == reason
    assert msgs[0].error.request_id == "r"
    _, msgs = r.generate(prompt="Hello", raw=True)
    assert msgs[-1].WhichOneof("msg") == "done"


def test_cancel_mid_generation_ends_it_with_done_cancelled(loaded: tuple[Runner, Path]) -> None:
    r, _ = loaded
    r.send(
        generate=runner_pb2.Generate(
            request_id="long", prompt="Hi", raw=True, max_tokens=LONG_DECODE
        )
    )
    while r.recv().WhichOneof("msg") != "tokens":
        pass
    r.send(cancel=runner_pb2.Cancel(request_id="long"))
    deadline = time.monotonic() + 5
    msg = r.recv(5)
    while msg.WhichOneof("msg") == "tokens":
        assert time.monotonic() < deadline, "still generating 5 s after Cancel"
        msg = r.recv(5)
    assert msg.WhichOneof("msg") == "done", msg
    assert msg.done.request_id == "long"
    assert msg.done.stop_reason == "cancelled"
    assert 0 < msg.done.generation_tokens < LONG_DECODE
    # The runner goes on serving.
    _, msgs = r.generate(prompt="Hello", raw=True)
    assert msgs[-1].done.stop_reason == "length"


@pytest.mark.parametrize(
    ("make", "reason", "exit_code"),
    [
        (models.unknown_architecture, "model_unsupported", 65),
        (models.truncated_weights, "weights_corrupt", 65),
        (models.weights_fifo, "weights_corrupt", 65),
        (models.config_not_json, "model_unreadable", 65),
        (models.mismatched_shapes, "weights_corrupt", 65),
    ],
    ids=["unknown-arch", "truncated", "fifo", "config-not-json", "shape-mismatch"],
)
def test_failed_load_reports_its_reason_and_exits(
    runner: Runner, make: Any, reason: str, exit_code: int
) -> None:
    runner.hello()
    end = runner.load(make(), timeout=60)
    assert end.WhichOneof("msg") == "error", end
    assert end.error.request_id == ""
    assert end.error.reason == reason
    assert "\n" not in end.error.message
    assert runner.wait(10) == exit_code


def test_missing_model_dir_is_not_found(runner: Runner, tmp_path: Path) -> None:
    runner.hello()
    end = runner.load(tmp_path / "nothing-here")
    assert end.error.reason == "model_not_found"


def test_shutdown_before_load_exits_0(runner: Runner) -> None:
    runner.hello()
    runner.send(shutdown=runner_pb2.Shutdown())
    assert runner.wait(10) == 0


def test_shutdown_after_load_exits_0(runner: Runner) -> None:
    runner.hello()
    assert runner.load(models.demo_model()).WhichOneof("msg") == "ready"
    runner.send(shutdown=runner_pb2.Shutdown())
    assert runner.wait(10) == 0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def test_closing_the_pipe_ends_the_runner_and_its_group() -> None:
    # A new group in this session (not a new session), so that a helper can join it.
    r = Runner(own_session=False)
    try:
        r.hello()
        helper = subprocess.Popen(["sleep", "60"], process_group=r.proc.pid)
        try:
            r.sock.close()
            start = time.monotonic()
            assert r.wait(2) == -signal.SIGKILL
            assert helper.wait(max(0.1, 2 - (time.monotonic() - start))) == -signal.SIGKILL
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
    finally:
        r.close()


def test_runner_dies_with_its_parent_even_with_the_pipe_open() -> None:
    # A stand-in parent spawns the runner and is then killed, while this test still holds the
    # daemon's end of the pipe: only PR_SET_PDEATHSIG can end the runner.
    ours, theirs = socket.socketpair()
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"fd = {theirs.fileno()}\n"
        "p = subprocess.Popen([sys.executable, '-m', 'exod.runners.runner', '--fd', str(fd),\n"
        "    '--parent', str(os.getpid())], pass_fds=[fd], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    theirs.close()
    runner_pid = 0
    try:
        assert parent.stdout is not None
        runner_pid = int(parent.stdout.readline())
        write_message_sync(
            ours,
            runner_pb2.ToRunner(hello=runner_pb2.Hello(protocol_version=RUNNER_PROTOCOL_VERSION)),
            threading.Lock(),
        )
        ours.settimeout(30)
        assert read_message_sync(ours, runner_pb2.FromRunner) is not None  # armed and serving
        parent.kill()
        parent.wait()
        assert _wait_gone([runner_pid], 2), "runner outlived its parent"
    finally:
        ours.close()
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if runner_pid and not _gone(runner_pid):
            os.killpg(runner_pid, signal.SIGKILL)  # its own group, started by this test


def test_runner_whose_parent_is_already_gone_exits_at_once() -> None:
    # --parent names a pid that is not the runner's parent: as if the daemon died at spawn.
    r = Runner(parent=1)
    try:
        assert r.wait(10) == 69
    finally:
        r.close()
