"""Every failure as an HTTP status with OpenAI's error body, in one table next to the CLI's.

A failure of a run carries a reason from exod/errors.py; STATUSES gives each reason its HTTP
status, so an HTTP client and `exoctl run` are told the same thing (docs/openai.md lists both
side by side, and a test keeps that page in step with this table). The body is the one OpenAI's
clients parse: {"error": {"message", "type", "param", "code"}}, with our reason as the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from exod.errors import ExoError


@dataclass(frozen=True)
class Status:
    code: int
    retry_after: int | None = None  # seconds, for a status that is worth retrying as it is


STATUSES: dict[str, Status] = {
    # The request is wrong: sending it again changes nothing.
    "invalid_argument": Status(400),
    "prompt_empty": Status(400),
    "prompt_too_long": Status(400),
    "permission_denied": Status(403),
    # The cluster's (never the answer to a run today; listed so that every reason has a status).
    "invite_refused": Status(403),
    "protocol_mismatch": Status(500),
    # A copied home: no request can succeed on this node until it gets a home of its own.
    "copied_home": Status(500),
    "model_not_found": Status(404),
    "runner_not_found": Status(404),
    "node_not_found": Status(404),
    # The model cannot run here. Not a 5xx: clients retry those, and retrying cannot help.
    "model_unreadable": Status(422),
    "model_unsupported": Status(422),
    "weights_corrupt": Status(422),
    "model_too_large": Status(422),
    # Gone before it finished: only a client that stopped listening is told (and never hears).
    "cancelled": Status(499),
    "internal": Status(500),
    # Busy, or the runner went away: the same request may well work in a moment.
    "queue_full": Status(503, retry_after=2),
    "memory_short": Status(503, retry_after=10),
    "memory_limit": Status(503, retry_after=10),
    "killed": Status(503, retry_after=1),
    "crashed": Status(503, retry_after=1),
    "rank_failed": Status(503, retry_after=1),
    "evicted": Status(503, retry_after=1),
    "idle": Status(503, retry_after=1),
    "interrupted": Status(503, retry_after=1),
    "daemon_stopped": Status(503, retry_after=5),
    "home_locked": Status(503, retry_after=5),
    "peer_unreachable": Status(503, retry_after=5),
    # A deadline that exod enforces passed.
    "load_timeout": Status(504),
    "load_stall": Status(504),
    "decode_stall": Status(504),
    "queue_timeout": Status(504),
    "disk_full": Status(507),
}

# For a reason this table does not know yet (the tests require every reason to be listed).
_BY_GRPC_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
}


class HttpError(Exception):
    """A failure that becomes one HTTP response: its status, headers and OpenAI error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> HttpError:
        return cls(400, "invalid_argument", message, param=param)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="exod"'
        return headers


def error_type(status: int) -> str:
    """OpenAI's `type`: its API says invalid_request_error for every 4xx, server_error else."""
    return "invalid_request_error" if status < 500 else "server_error"


def from_exo(err: ExoError) -> HttpError:
    status = STATUSES.get(err.reason)
    if status is None:
        status = Status(_BY_GRPC_CODE.get(err.code, 500))
    return HttpError(status.code, err.reason, err.message, retry_after=status.retry_after)
