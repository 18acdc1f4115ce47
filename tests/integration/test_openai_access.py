"""The API key: without it, or with a wrong one, a request gets 401 and nothing runs; exod refuses
to listen beyond loopback without one, and to start on a port that is taken.

No test here listens beyond loopback: that would open a port to the network (and, on macOS, ask
the user to allow it). The key is enforced the same way on every address, so it is tested on
127.0.0.1, and the refusal to go beyond loopback without a key is tested before anything binds.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import openai
import pytest

from tests import models
from tests.daemon import Daemon
from tests.httpapi import HOST, client, free_port, http_daemon, request
from tests.reference import expected

KEY = "s3cret-key-0123456789abcdef"
PROMPT = "Once upon a time"


def exod_exit(d: Daemon) -> tuple[int, str]:
    """Start exod expecting it to refuse; its exit code and log."""
    d.start(wait=False)
    assert d.proc is not None
    try:
        code = d.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"exod did not refuse to start:\n{d.log()}") from None
    return code, d.log()


def test_without_the_key_or_with_a_wrong_one_nothing_runs(
    daemon_factory: list[Daemon], tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    d, port = http_daemon(tmp_path / "home", EXOD_API_KEY_FILE=str(key_file))
    daemon_factory.append(d)
    d.start()
    d.ok("models", "add", "qwen", str(models.demo_model("qwen2")))
    body = {"model": "qwen", "prompt": PROMPT, "max_tokens": 8}
    wrong = [
        {},
        {"Authorization": "Bearer " + KEY[:-1]},
        {"Authorization": "Bearer " + KEY + "x"},
        {"Authorization": KEY},
        {"Authorization": "Basic " + KEY},
    ]
    for headers in wrong:
        for method, path, data in (("GET", "/v1/models", None), ("POST", "/v1/completions", body)):
            answer = request(port, method, path, data, headers)
            assert answer.status == 401, (headers, answer)
            assert answer.error["code"] == "invalid_api_key"
            assert answer.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong-key-0123456789").completions.create(
            model="qwen", prompt=PROMPT, max_tokens=8
        )
    kinds = {e["kind"] for e in d.events()}
    assert "RunAccepted" not in kinds and "RunnerSpawned" not in kinds, kinds
    # With the key, everything works.
    c = client(port, key=KEY)
    assert [m.id for m in c.models.list()] == ["qwen"]
    text = c.completions.create(model="qwen", prompt=PROMPT, max_tokens=8).choices[0].text
    assert text == expected(models.demo_model(), PROMPT, 8).text


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_beyond_loopback_without_a_key_exod_exits_78(tmp_path: Path, bind: str) -> None:
    d, port = http_daemon(tmp_path / "home", EXOD_HTTP_BIND=bind)
    code, log = exod_exit(d)
    assert code == 78, log
    assert "EXOD_API_KEY_FILE" in log
    with socket.socket() as probe:  # nothing was bound
        assert probe.connect_ex((HOST, port)) != 0


@pytest.mark.parametrize("content", [None, "short"], ids=["missing", "weak"])
def test_a_missing_or_weak_key_file_exits_78(tmp_path: Path, content: str | None) -> None:
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    d, _ = http_daemon(tmp_path / "home", EXOD_API_KEY_FILE=str(key_file))
    code, log = exod_exit(d)
    assert code == 78, log
    assert str(key_file) in log


def test_a_port_in_use_exits_75(tmp_path: Path) -> None:
    port = free_port()
    with socket.create_server((HOST, port)):
        d = Daemon.create(tmp_path / "home", EXOD_HTTP_PORT=str(port))
        code, log = exod_exit(d)
    assert code == 75, log
    assert "EXOD_HTTP_PORT" in log and f"127.0.0.1:{port}" in log
    assert not d.socket.exists()  # it stopped before serving anything
