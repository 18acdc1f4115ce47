"""Every failure reason has an HTTP status, the docs list it next to the CLI's exit code, and the
body is the one OpenAI's clients parse."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from exod.errors import REASONS, ExoError
from exod.openai.app import no_such_path
from exod.openai.errors import STATUSES, HttpError, error_type, from_exo

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "openai.md"
# The HTTP request's own failures, which no reason describes: code -> (status, exit).
HTTP_ONLY = {
    "invalid_json": (400, 64),
    "invalid_api_key": (401, 77),
    "host_not_allowed": (403, 77),
    "not_found": (404, 64),
    "method_not_allowed": (405, 64),
    "body_too_large": (413, 64),
    "unsupported_media_type": (415, 64),
}


def doc_rows() -> dict[str, tuple[str, str]]:
    """`code` -> (status cell, exit cell) from the tables of docs/openai.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.fullmatch(r"\| `([a-z_]+)` \| ([^|]+) \| (\d+) \|.*", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3))
    return rows


def test_every_reason_has_a_status() -> None:
    assert set(STATUSES) == set(REASONS)


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_reason_is_documented_with_its_status_and_exit_code(reason: str) -> None:
    status = STATUSES[reason]
    cell = str(status.code)
    if status.retry_after is not None:
        cell += f" + `Retry-After: {status.retry_after}`"
    assert doc_rows().get(reason) == (cell, str(int(REASONS[reason].exit)))


@pytest.mark.parametrize(("code", "want"), sorted(HTTP_ONLY.items()))
def test_every_http_failure_is_documented(code: str, want: tuple[int, int]) -> None:
    assert doc_rows().get(code) == (str(want[0]), str(want[1]))


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("invalid_argument", 400),
        ("prompt_too_long", 400),
        ("model_not_found", 404),
        ("weights_corrupt", 422),
        ("queue_full", 503),
        ("memory_short", 503),
        ("load_timeout", 504),
        ("load_stall", 504),
        ("decode_stall", 504),
        ("queue_timeout", 504),
        ("daemon_stopped", 503),
        ("internal", 500),
    ],
)
def test_the_issues_statuses(reason: str, status: int) -> None:
    assert from_exo(ExoError(reason, "m")).status == status


def test_every_503_says_when_to_retry_and_nothing_else_does() -> None:
    for reason, status in STATUSES.items():
        assert (status.code == 503) == (status.retry_after is not None), reason


def test_a_run_failure_becomes_openais_body() -> None:
    err = from_exo(ExoError("queue_full", "3 runs wait; retry later"))
    assert err.status == 503
    assert err.body() == {
        "error": {
            "message": "3 runs wait; retry later",
            "type": "server_error",
            "param": None,
            "code": "queue_full",
        }
    }
    assert err.headers() == {"Retry-After": "2"}


def test_a_bad_field_names_itself() -> None:
    err = HttpError.bad_request("max_tokens must be an integer", "max_tokens")
    assert err.body()["error"] == {
        "message": "max_tokens must be an integer",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "invalid_argument",
    }
    assert err.headers() == {}


def test_401_asks_for_a_bearer_token() -> None:
    assert "Bearer" in HttpError(401, "invalid_api_key", "no key").headers()["WWW-Authenticate"]


def test_error_type_follows_openai() -> None:
    assert [error_type(s) for s in (400, 401, 404, 413, 499, 500, 503, 504)] == [
        "invalid_request_error"
    ] * 5 + ["server_error"] * 3


def test_a_reason_missing_from_the_table_falls_back_on_its_grpc_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(STATUSES, "load_stall")
    assert REASONS["load_stall"].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert from_exo(ExoError("load_stall", "m")).status == 504
    monkeypatch.delitem(STATUSES, "internal")
    assert from_exo(ExoError("internal", "m")).status == 500


@pytest.mark.parametrize(
    ("path", "meant"),
    [
        ("/models", "/v1/models"),
        ("/models/qwen", "/v1/models/qwen"),
        ("/chat/completions", "/v1/chat/completions"),
        ("/completions/", "/v1/completions"),
        ("/", "/v1/chat/completions"),
        ("/api/generate", "/v1/chat/completions"),
    ],
)
def test_a_path_outside_v1_is_told_the_path_meant(path: str, meant: str) -> None:
    err = no_such_path(path)
    assert (err.status, err.code) == (404, "not_found")
    assert f"the API is under /v1, e.g. {meant} " in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_an_unknown_path_under_v1_lists_the_api() -> None:
    assert no_such_path("/v1/embeddings").message == (
        "no such path /v1/embeddings: the API has /v1/models, /v1/chat/completions, /v1/completions"
    )
