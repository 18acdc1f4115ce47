"""The real model through the product: SmolLM2-135M-Instruct's Q4_1 GGUF imported with
`exoctl models add`, then asked through `exoctl run` and `/v1/chat/completions` (its own chat
template), and `exoctl run --raw` byte for byte against mlx_lm.generate on the converted
directory. Skips when the GGUF is not cached (tests/smollm2.py), fails then under
EXOD_REQUIRE_SMOLLM2=1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.httpapi import http_daemon, request
from tests.reference import expected
from tests.smollm2 import smollm2_gguf

QUESTION = "What is the capital of France?"


@dataclass
class Imported:
    daemon: Daemon
    port: int
    path: Path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    gguf = smollm2_gguf()
    d, port = http_daemon(tmp_path_factory.mktemp("smollm2") / "home")
    d.start()
    try:
        added = d.exoctl("models", "add", "smollm2", str(gguf), "--json", timeout=300)
        assert added.code == 0, added
        yield Imported(d, port, Path(added.json_lines()[-1]["path"]))
    finally:
        d.cleanup()


def test_run_answers_paris_as_mlx_lm_does(smollm2: Imported) -> None:
    ran = smollm2.daemon.exoctl("run", "smollm2", QUESTION, "--max-tokens", "24")
    assert ran.code == 0, ran
    assert "Paris" in ran.text
    assert ran.stdout == expected(smollm2.path, QUESTION, 24, chat=True).stdout


def test_raw_equals_mlx_lm_generate_byte_for_byte(smollm2: Imported) -> None:
    prompt = "The three largest cities of France are"
    ran = smollm2.daemon.exoctl("run", "--raw", "smollm2", prompt, "--max-tokens", "32")
    assert ran.code == 0, ran
    assert ran.stdout == expected(smollm2.path, prompt, 32).stdout


def test_chat_completions_answers_with_the_template(smollm2: Imported) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 24,
    }
    answer = request(smollm2.port, "POST", "/v1/chat/completions", body)
    assert answer.status == 200, answer
    (choice,) = answer.json()["choices"]
    assert "Paris" in choice["message"]["content"]
    assert choice["message"]["content"] == expected(smollm2.path, QUESTION, 24, chat=True).text
