"""`exoctl run` prints exactly what mlx_lm.generate produces, and reuses a loaded runner."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.daemon import Daemon, Event, stderr_of
from tests.reference import expected

NON_ASCII = "Grüße aus München — 你好，世界 🦊 и ещё"  # noqa: RUF001  # non-ASCII on purpose
PROMPTS = ["Once upon a time", NON_ASCII]


def model_of(request: pytest.FixtureRequest, arch: str) -> Path:
    path: Path = request.getfixturevalue(arch)
    return path


def spawned_for(events: list[Event], model: Path) -> list[str]:
    return [
        e["runner_id"]
        for e in events
        if e["kind"] == "RunnerSpawned" and e["model_path"] == str(model)
    ]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["ascii", "non-ascii"])
def test_raw_prints_what_mlx_lm_generates(
    shared_exod: Daemon, request: pytest.FixtureRequest, arch: str, prompt: str
) -> None:
    model = model_of(request, arch)
    result = shared_exod.exoctl("run", str(model), prompt, "--max-tokens", "40", "--raw")
    assert result.code == 0, result
    assert result.stdout == expected(model, prompt, 40).stdout
    assert result.stderr == ""  # progress goes to a terminal only


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_chat_template_applies_by_default(
    shared_exod: Daemon, request: pytest.FixtureRequest, arch: str
) -> None:
    model = model_of(request, arch)
    result = shared_exod.exoctl("run", str(model), NON_ASCII, "--max-tokens", "40")
    assert result.code == 0, result
    want = expected(model, NON_ASCII, 40, chat=True)
    assert result.stdout == want.stdout
    # The template matters: the raw prompt generates something else.
    assert want.text != expected(model, NON_ASCII, 40).text


def test_prompt_from_stdin_is_taken_byte_for_byte(shared_exod: Daemon, qwen2: Path) -> None:
    prompt = NON_ASCII + "\n"
    result = shared_exod.exoctl(
        "run", str(qwen2), "--max-tokens", "24", "--raw", input=prompt.encode()
    )
    assert result.code == 0, result
    assert result.stdout == expected(qwen2, prompt, 24).stdout


def test_json_prints_token_lines_then_done(shared_exod: Daemon, llama: Path) -> None:
    result = shared_exod.exoctl("run", str(llama), NON_ASCII, "--max-tokens", "40", "--json")
    assert result.code == 0, result
    lines = result.json_lines()
    *tokens, done = lines
    want = expected(llama, NON_ASCII, 40, chat=True)
    assert tokens, "no token lines"
    assert all(set(t) == {"type", "text"} and t["type"] == "token" for t in tokens), tokens
    assert "".join(t["text"] for t in tokens) == want.text
    assert done["type"] == "done"
    assert done["generation_tokens"] == want.generation_tokens
    assert done["stop_reason"] == want.finish_reason
    assert done["prompt_tokens"] > 0
    assert done["ttft_s"] > 0
    assert done["tokens_per_s"] > 0


def test_second_run_reuses_the_loaded_runner(shared_exod: Daemon, qwen2: Path) -> None:
    for max_tokens in ("8", "9"):
        result = shared_exod.exoctl("run", str(qwen2), "Hello", "--max-tokens", max_tokens)
        assert result.code == 0, result
    events = shared_exod.events()
    spawned = spawned_for(events, qwen2)
    assert len(spawned) == 1, spawned
    ready = [e for e in events if e["kind"] == "RunnerReady" and e["runner_id"] in spawned]
    assert len(ready) == 1, ready
    accepted = [e for e in events if e["kind"] == "RunAccepted" and e["model"] == str(qwen2)]
    assert len(accepted) >= 2
    assert {e["runner_id"] for e in accepted} == set(spawned)


def test_reader_closing_stdout_ends_run_quietly(shared_exod: Daemon, qwen2: Path) -> None:
    """`exoctl run ... | head -c 10`: exit 0, nothing on stderr, the generation cancelled."""
    since = shared_exod.last_seq()
    exoctl = shared_exod.exoctl_bg("run", str(qwen2), "Once upon a time", "--max-tokens", "2000")
    assert exoctl.stdout is not None
    head = subprocess.Popen(["head", "-c", "10"], stdin=exoctl.stdout, stdout=subprocess.PIPE)
    exoctl.stdout.close()  # only head reads it now
    head_out, _ = head.communicate(timeout=60)
    assert exoctl.wait(timeout=60) == 0
    assert stderr_of(exoctl) == ""
    want = expected(qwen2, "Once upon a time", 40, chat=True).text.encode()
    assert len(want) > 20
    assert head_out == want[:10]
    accepted = shared_exod.wait_event(lambda e: e["kind"] == "RunAccepted", since=since)
    finished = shared_exod.wait_event(
        lambda e: e["kind"] == "RunFinished" and e["run_id"] == accepted["run_id"], since=since
    )
    assert finished["stop_reason"] == "cancelled"
