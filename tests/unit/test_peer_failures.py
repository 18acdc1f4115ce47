"""exod.errors.from_peer: how another exod's failed call reads on this node (the pure mapping
that ca_client, the join, the weight push, the ranks and runs on a member all use)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from exod.errors import REASON_KEY, REASONS, from_peer

WORDS = {
    "unreachable": "it went away",
    "unimplemented": "upgrade it",
}


def failed(
    code: grpc.StatusCode, details: str = "what grpc said", reason: str = ""
) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(*([(REASON_KEY, reason)] if reason else []))
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), trailing, details=details, debug_error_string=""
    )


def mapped(e: grpc.aio.AioRpcError, **words: Any) -> tuple[str, str]:
    err = from_peer(e, "node n-1 failed the call", **words)
    return err.reason, err.message


def test_the_reason_the_member_gave_comes_first_whatever_the_code() -> None:
    e = failed(grpc.StatusCode.UNAVAILABLE, "no room", reason="model_too_large")
    gone = (grpc.StatusCode.UNAVAILABLE,)
    assert mapped(e, gone=gone, **WORDS) == ("model_too_large", "no room")
    assert mapped(e, refused="node n-1 refused: no room") == (
        "model_too_large",
        "node n-1 refused: no room",
    )


def test_a_reason_without_words_says_its_summary_unless_told_otherwise() -> None:
    e = failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "", reason="model_too_large")
    assert mapped(e) == ("model_too_large", REASONS["model_too_large"].summary)
    assert mapped(e, refused="") == ("model_too_large", "")


def test_a_code_in_gone_is_peer_unreachable_only_when_asked() -> None:
    e = failed(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert mapped(e, gone=(grpc.StatusCode.DEADLINE_EXCEEDED,), **WORDS) == (
        "peer_unreachable",
        "it went away",
    )
    assert mapped(e, **WORDS) == ("internal", "node n-1 failed the call: what grpc said")


@pytest.mark.parametrize("unimplemented", ["upgrade it", None])
def test_unimplemented_is_protocol_mismatch_when_the_call_has_words_for_it(
    unimplemented: str | None,
) -> None:
    e = failed(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    want = (
        ("protocol_mismatch", "upgrade it")
        if unimplemented
        else ("internal", "node n-1 failed the call: Method not found!")
    )
    assert mapped(e, unimplemented=unimplemented) == want
