"""Bad input gets a precise exit code, spawns nothing it need not, and leaves exod serving."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from exod.errors import REASON_KEY
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc
from tests import models
from tests.daemon import ALIVE_STATES, Daemon, short_dir
from tests.reference import expected

GOOD_PROMPT = "Hello"


@pytest.fixture(autouse=True)
def still_serves(shared_exod: Daemon, qwen2: Path) -> Iterator[None]:
    """After each test: the same exod still runs a good request correctly."""
    yield
    assert shared_exod.alive(), shared_exod.log()[-3000:]
    result = shared_exod.exoctl("run", str(qwen2), GOOD_PROMPT, "--max-tokens", "8")
    assert result.code == 0, result
    assert result.stdout == expected(qwen2, GOOD_PROMPT, 8, chat=True).stdout
    assert shared_exod.status()["pid"] == shared_exod.pid


def spawned_since(d: Daemon, seq: int) -> list[str]:
    return [e["runner_id"] for e in d.events(seq) if e["kind"] == "RunnerSpawned"]


def test_daemon_not_running_is_69(tmp_path: Path, qwen2: Path) -> None:
    absent = Daemon.create(tmp_path / "never-started")
    for args in (
        ("run", str(qwen2), GOOD_PROMPT),
        ("status",),
        ("status", "--json"),
        ("kill", "--all"),
        ("events",),
        ("models", "list"),
    ):
        result = absent.exoctl(*args)
        assert result.code == 69, (args, result)
        assert "Traceback" not in result.stderr
        assert str(absent.socket) in result.stderr  # says where it looked


def test_missing_model_directory_is_66_before_any_connection(
    shared_exod: Daemon, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    # With no exod anywhere: the check is exoctl's own, so no connection is even tried (69).
    nowhere = {"EXOD_SOCKET": str(short_dir() / "absent.sock")}
    for model in (str(missing), "./no-such-model", "~/no-such-model-here"):
        result = shared_exod.exoctl("run", model, GOOD_PROMPT, env=nowhere)
        assert result.code == 66, (model, result)
        assert "does not exist" in result.stderr
    result = shared_exod.exoctl("run", str(missing), GOOD_PROMPT)
    assert result.code == 66, result


BROKEN: dict[str, Callable[[], Path]] = {
    "config-not-json": models.config_not_json,
    "unknown-architecture": models.unknown_architecture,
    "truncated-weights": models.truncated_weights,
    "garbled-weights-header": models.garbled_weights_header,
    "weights-fifo": models.weights_fifo,
    "no-weights": models.no_weights,
    "mismatched-shapes": models.mismatched_shapes,
}


@pytest.mark.parametrize("broken", BROKEN, ids=list(BROKEN))
def test_model_that_cannot_run_is_65(shared_exod: Daemon, broken: str) -> None:
    model = BROKEN[broken]()
    result = shared_exod.exoctl("run", str(model), GOOD_PROMPT, "--max-tokens", "4", timeout=60)
    assert result.code == 65, result
    assert result.stdout == b""
    assert len(result.stderr.splitlines()) == 1, result  # one line, no traceback
    # No runner is left for it, whether or not one was spawned to find out.
    for runner in shared_exod.status()["runners"]:
        if runner["model_path"] == str(model):
            assert runner["state"] not in ALIVE_STATES, runner


@pytest.mark.parametrize("broken", ["config-not-json", "unknown-architecture", "truncated-weights"])
def test_cannot_run_is_found_without_spawning_a_runner(shared_exod: Daemon, broken: str) -> None:
    since = shared_exod.last_seq()
    result = shared_exod.exoctl("run", str(BROKEN[broken]()), GOOD_PROMPT)
    assert result.code == 65, result
    assert spawned_since(shared_exod, since) == []


ONE_MB = b"word " * ((1 << 20) // 5 + 1)

# What follows MODEL on the command line, stdin, and words the one line on stderr must hold.
BAD_REQUESTS: dict[str, tuple[tuple[str, ...], bytes, str]] = {
    "max-tokens-0": ((GOOD_PROMPT, "--max-tokens", "0"), b"", "--max-tokens"),
    "max-tokens-negative": ((GOOD_PROMPT, "--max-tokens", "-3"), b"", "--max-tokens"),
    "negative-temperature": ((GOOD_PROMPT, "--temperature", "-1"), b"", "--temperature"),
    "nan-temperature": ((GOOD_PROMPT, "--temperature", "nan"), b"", "--temperature"),
    "empty-argument": (("",), b"", "empty"),
    "empty-stdin": ((), b"", "empty"),
    "1MB-stdin": ((), ONE_MB, "tokens, more than"),  # more tokens than any limit allows
    "invalid-utf8-stdin": ((), b"\xff\xfe not UTF-8", "UTF-8"),
    "invalid-utf8-argument": (("\udcff\udcfe",), b"", "UTF-8"),  # argv bytes not UTF-8
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_is_64_and_spawns_nothing(shared_exod: Daemon, case: str) -> None:
    tail, stdin, words = BAD_REQUESTS[case]
    model = models.copy_model()  # no runner exists for it: a spawn would be this request's
    since = shared_exod.last_seq()
    result = shared_exod.exoctl("run", str(model), *tail, input=stdin)
    assert result.code == 64, result
    assert result.stdout == b""
    assert words in result.stderr, result
    assert len(result.stderr.splitlines()) == 1, result  # one line, no traceback
    assert spawned_since(shared_exod, since) == []


def test_prompt_over_exod_max_prompt_tokens_is_64(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = Daemon.create(tmp_path / "home", EXOD_MAX_PROMPT_TOKENS="16")
    daemon_factory.append(d)
    d.start()
    long_prompt = "the cat sat on the mat and the dog ran in the park " * 4
    result = d.exoctl("run", str(qwen2), long_prompt, "--raw", "--max-tokens", "4")
    assert result.code == 64, result
    assert "EXOD_MAX_PROMPT_TOKENS" in result.stderr
    assert [e for e in d.events() if e["kind"] == "RunnerSpawned"] == []
    # A prompt within the limit runs.
    result = d.exoctl("run", str(qwen2), "the cat sat", "--raw", "--max-tokens", "4")
    assert result.code == 0, result
    assert result.stdout == expected(qwen2, "the cat sat", 4).stdout


def test_unknown_registered_name_is_66(shared_exod: Daemon) -> None:
    since = shared_exod.last_seq()
    result = shared_exod.exoctl("run", "no-such-name", GOOD_PROMPT)
    assert result.code == 66, result
    assert "no-such-name" in result.stderr
    assert spawned_since(shared_exod, since) == []


def _direct_run(socket: Path, request: control_pb2.RunRequest) -> tuple[grpc.StatusCode, str]:
    """A Run call straight over gRPC, as a client other than exoctl would make it."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        try:
            for _ in stub.Run(request, timeout=60):
                pass
        except grpc.RpcError as e:
            call = cast(grpc.Call, e)  # what gRPC raises for a call is the call itself
            reasons = [v for k, v in call.trailing_metadata() or () if k == REASON_KEY]
            return call.code(), str(reasons[0]) if reasons else ""
    raise AssertionError("the call succeeded")


def test_daemon_refuses_bad_requests_that_skip_exoctls_checks(shared_exod: Daemon) -> None:
    model = str(models.copy_model())
    since = shared_exod.last_seq()
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        (control_pb2.RunRequest(model=model, prompt="Hi"), invalid, "invalid_argument"),
        (
            control_pb2.RunRequest(model=model, prompt="Hi", max_tokens=-1),
            invalid,
            "invalid_argument",
        ),
        (control_pb2.RunRequest(model=model, max_tokens=4), invalid, "prompt_empty"),
        (
            control_pb2.RunRequest(model=model, prompt=ONE_MB.decode(), max_tokens=4),
            invalid,
            "prompt_too_long",
        ),
        (
            control_pb2.RunRequest(model=model, prompt="Hi", max_tokens=4, temperature=-1.0),
            invalid,
            "invalid_argument",
        ),
        (control_pb2.RunRequest(prompt="Hi", max_tokens=4), invalid, "invalid_argument"),
        (
            control_pb2.RunRequest(model="no-such-name", prompt="Hi", max_tokens=4),
            not_found,
            "model_not_found",
        ),
        (
            control_pb2.RunRequest(model="some/dir", prompt="Hi", max_tokens=4),
            not_found,
            "model_not_found",
        ),
    ]
    for request, code, reason in cases:
        assert _direct_run(shared_exod.socket, request) == (code, reason), request
    assert spawned_since(shared_exod, since) == []
