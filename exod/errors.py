"""The one table of failure reasons: what the daemon reports and what exoctl exits with.

The daemon ends a failed call with a gRPC status whose trailing metadata `exo-reason` holds one
of these reasons; exoctl maps the reason (or, failing that, the gRPC code) to an exit code from
sysexits.h. Keeping both directions in one table means a reason cannot exist on one side only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NoReturn, cast

import grpc

REASON_KEY = "exo-reason"


class Exit(IntEnum):
    OK = 0
    USAGE = 64
    CANNOT_RUN = 65
    NOT_FOUND = 66
    UNAVAILABLE = 69
    INTERNAL = 70
    TEMPFAIL = 75
    PERMISSION = 77
    CONFIG = 78
    INTERRUPTED = 130


@dataclass(frozen=True)
class Reason:
    code: grpc.StatusCode
    exit: Exit
    summary: str


REASONS: dict[str, Reason] = {
    # bad input
    "invalid_argument": Reason(grpc.StatusCode.INVALID_ARGUMENT, Exit.USAGE, "invalid argument"),
    "prompt_empty": Reason(grpc.StatusCode.INVALID_ARGUMENT, Exit.USAGE, "the prompt is empty"),
    "prompt_too_long": Reason(grpc.StatusCode.INVALID_ARGUMENT, Exit.USAGE, "prompt too long"),
    # the model cannot run here
    "model_unreadable": Reason(
        grpc.StatusCode.FAILED_PRECONDITION, Exit.CANNOT_RUN, "model files unreadable"
    ),
    "model_unsupported": Reason(
        grpc.StatusCode.FAILED_PRECONDITION, Exit.CANNOT_RUN, "architecture not supported"
    ),
    "weights_corrupt": Reason(
        grpc.StatusCode.FAILED_PRECONDITION, Exit.CANNOT_RUN, "weights corrupt or truncated"
    ),
    "model_too_large": Reason(
        grpc.StatusCode.FAILED_PRECONDITION, Exit.CANNOT_RUN, "model larger than this machine"
    ),
    # not found
    "model_not_found": Reason(grpc.StatusCode.NOT_FOUND, Exit.NOT_FOUND, "model not found"),
    "runner_not_found": Reason(grpc.StatusCode.NOT_FOUND, Exit.NOT_FOUND, "runner not found"),
    "node_not_found": Reason(grpc.StatusCode.NOT_FOUND, Exit.NOT_FOUND, "no such cluster member"),
    # temporary failures
    "load_timeout": Reason(grpc.StatusCode.DEADLINE_EXCEEDED, Exit.TEMPFAIL, "load timed out"),
    "load_stall": Reason(grpc.StatusCode.DEADLINE_EXCEEDED, Exit.TEMPFAIL, "load stalled"),
    "decode_stall": Reason(grpc.StatusCode.DEADLINE_EXCEEDED, Exit.TEMPFAIL, "decode stalled"),
    "queue_timeout": Reason(grpc.StatusCode.DEADLINE_EXCEEDED, Exit.TEMPFAIL, "waited too long"),
    "memory_short": Reason(grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.TEMPFAIL, "memory short now"),
    "memory_limit": Reason(grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.TEMPFAIL, "memory limit hit"),
    "queue_full": Reason(grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.TEMPFAIL, "queue full"),
    "disk_full": Reason(grpc.StatusCode.RESOURCE_EXHAUSTED, Exit.TEMPFAIL, "disk full"),
    "killed": Reason(grpc.StatusCode.ABORTED, Exit.TEMPFAIL, "runner killed"),
    "crashed": Reason(grpc.StatusCode.ABORTED, Exit.TEMPFAIL, "runner died"),
    "rank_failed": Reason(grpc.StatusCode.ABORTED, Exit.TEMPFAIL, "a rank of a split model failed"),
    "evicted": Reason(grpc.StatusCode.ABORTED, Exit.TEMPFAIL, "runner evicted"),
    "idle": Reason(grpc.StatusCode.ABORTED, Exit.TEMPFAIL, "runner stopped when idle"),
    "interrupted": Reason(grpc.StatusCode.ABORTED, Exit.TEMPFAIL, "interrupted by a restart"),
    "home_locked": Reason(
        grpc.StatusCode.UNAVAILABLE, Exit.TEMPFAIL, "another exod holds the home"
    ),
    "peer_unreachable": Reason(
        grpc.StatusCode.UNAVAILABLE, Exit.TEMPFAIL, "a cluster peer did not answer"
    ),
    # the cluster
    "invite_refused": Reason(
        grpc.StatusCode.PERMISSION_DENIED, Exit.PERMISSION, "invite used, expired or unknown"
    ),
    "protocol_mismatch": Reason(
        grpc.StatusCode.FAILED_PRECONDITION, Exit.CONFIG, "peer speaks another protocol version"
    ),
    "copied_home": Reason(
        grpc.StatusCode.FAILED_PRECONDITION, Exit.CONFIG, "this home is a copy of a member's"
    ),
    # the daemon
    "daemon_stopped": Reason(grpc.StatusCode.UNAVAILABLE, Exit.UNAVAILABLE, "daemon stopped"),
    "permission_denied": Reason(
        grpc.StatusCode.PERMISSION_DENIED, Exit.PERMISSION, "permission denied"
    ),
    "cancelled": Reason(grpc.StatusCode.CANCELLED, Exit.INTERRUPTED, "cancelled"),
    "internal": Reason(grpc.StatusCode.INTERNAL, Exit.INTERNAL, "internal error"),
}

# Used when a status carries no reason (a foreign server, or a failure inside gRPC itself).
_BY_CODE: dict[grpc.StatusCode, Exit] = {
    grpc.StatusCode.INVALID_ARGUMENT: Exit.USAGE,
    grpc.StatusCode.OUT_OF_RANGE: Exit.USAGE,
    grpc.StatusCode.FAILED_PRECONDITION: Exit.CANNOT_RUN,
    grpc.StatusCode.NOT_FOUND: Exit.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: Exit.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Exit.TEMPFAIL,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Exit.TEMPFAIL,
    grpc.StatusCode.ABORTED: Exit.TEMPFAIL,
    grpc.StatusCode.PERMISSION_DENIED: Exit.PERMISSION,
    grpc.StatusCode.UNAUTHENTICATED: Exit.PERMISSION,
    grpc.StatusCode.CANCELLED: Exit.INTERRUPTED,
}


def exit_code(reason: str | None, code: grpc.StatusCode | None) -> Exit:
    """The exit code for a failed call: by its reason when known, else by its gRPC code."""
    if reason is not None and reason in REASONS:
        return REASONS[reason].exit
    if code is not None:
        return _BY_CODE.get(code, Exit.INTERNAL)
    return Exit.INTERNAL


class ExoError(Exception):
    """A failure with a reason from REASONS and a message saying what to do."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def code(self) -> grpc.StatusCode:
        return REASONS[self.reason].code


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: ExoError) -> NoReturn:
    """End a call on exod's gRPC servers (control and peer) with the error's status, its
    reason in the trailing metadata (what exoctl maps to an exit code)."""
    await context.abort(err.code, err.message, trailing_metadata=((REASON_KEY, err.reason),))
    raise AssertionError("unreachable: abort raises")


def peer_reason(e: grpc.aio.AioRpcError) -> str | None:
    """The reason another exod gave for failing a call (its trailing metadata), when it is one
    of ours: `abort`'s counterpart on the calling side."""
    # (key, value) pairs at run time, whatever grpc-stubs says of aio's Metadata.
    pairs = cast("list[tuple[str, str | bytes]]", list(e.trailing_metadata() or ()))
    reason = next((v for k, v in pairs if k == REASON_KEY), "")
    return reason if isinstance(reason, str) and reason in REASONS else None


def from_peer(
    e: grpc.aio.AioRpcError,
    failed: str,
    *,
    refused: str | None = None,
    gone: tuple[grpc.StatusCode, ...] = (),
    unreachable: str = "",
    unimplemented: str | None = None,
) -> ExoError:
    """Another exod's failed call as an ExoError, the first that applies: the reason it gave
    (saying `refused`, else its own words or the reason's summary); peer_unreachable, saying
    `unreachable`, for a code in `gone`; protocol_mismatch, saying `unimplemented`, when its
    release lacks the call; else internal: `failed`, then what gRPC said."""
    reason = peer_reason(e)
    if reason is not None:
        said = refused if refused is not None else e.details() or REASONS[reason].summary
        return ExoError(reason, said)
    if e.code() in gone:
        return ExoError("peer_unreachable", unreachable)
    if unimplemented is not None and e.code() == grpc.StatusCode.UNIMPLEMENTED:
        return ExoError("protocol_mismatch", unimplemented)
    return ExoError("internal", f"{failed}: {e.details()}")
