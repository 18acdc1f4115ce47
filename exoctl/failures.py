"""What exoctl prints and exits with when something fails: one line and a sysexits code.

Pure: a failed call's status goes in, a Failure comes out; cli.py prints it. The exit code comes
from exod.errors, the one table that the daemon and exoctl share; this module only adds the words
that tell a user what to do next.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from exod.errors import REASON_KEY, REASONS, Exit, exit_code


class Failure(Exception):
    """A command failed: the exit code, and one line saying what happened and what to do."""

    def __init__(self, code: Exit, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


# What to do, by exit code; {socket} is filled in. exod's words for a bad argument already say
# what is wrong with it, and an interruption needs no advice.
_HINTS: dict[Exit, str] = {
    Exit.USAGE: "",
    Exit.CANNOT_RUN: "this model cannot run here; see docs/troubleshooting.md for each reason",
    Exit.NOT_FOUND: "check the name with `exoctl models list`",
    Exit.UNAVAILABLE: (
        "is exod running? start it with `exod` (or `exoctl service install`), socket: {socket}"
    ),
    Exit.INTERNAL: "this is a bug in exod; `exoctl events` and exod's log may say more",
    Exit.TEMPFAIL: "retry later",
    Exit.PERMISSION: "run exoctl as the user that runs exod (socket: {socket})",
    Exit.CONFIG: "check exod's settings with `exod --help`",
    Exit.INTERRUPTED: "",
}

# Where a reason calls for more precise advice than its exit code's.
_REASON_HINTS: dict[str, str] = {
    "runner_not_found": "list the runners with `exoctl status`",
    "model_too_large": "pick a smaller (or quantized) model",
    "memory_short": "stop other runners (`exoctl kill`) or retry later",
    "queue_full": "retry when fewer runs are waiting",
}


def hint(code: Exit, reason: str | None, socket: str) -> str:
    """What to do about a failure, or "" when there is nothing useful to say."""
    text = _REASON_HINTS.get(reason or "") or _HINTS.get(code, "")
    return text.format(socket=socket)


def one_line(what: str, advice: str) -> str:
    """`<what happened>. <what to do>` on a single line, whatever the inputs hold.

    A `what` that already ends a sentence with ? or ! (click's "Did you mean 'status'?") keeps
    its mark instead of gaining a period after it.
    """
    what = " ".join(what.split()).rstrip(".")
    end = "" if what.endswith(("?", "!")) else "."
    return f"{what}{end} {advice}" if advice else f"{what}{end}"


def reason_of(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The daemon's failure reason from a call's trailing metadata, if it sent one."""
    for key, value in metadata:
        if key == REASON_KEY:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def _unreachable(details: str, socket: str) -> tuple[Exit, str]:
    """Why the socket could not be reached, from gRPC's connect error (its errno's text)."""
    if "Permission denied" in details:
        # A socket we may not open: retrying or starting another exod would not help.
        return Exit.PERMISSION, f"permission denied on exod's socket {socket}"
    if "No such file or directory" in details:
        return Exit.UNAVAILABLE, "cannot reach exod: no socket there"
    if "Connection refused" in details:
        return Exit.UNAVAILABLE, "cannot reach exod: nothing is listening on its socket"
    # Anything else: gRPC's own words are the best clue there is.
    detail = " ".join(details.split())
    return Exit.UNAVAILABLE, f"cannot reach exod ({detail})" if detail else "cannot reach exod"


def from_status(
    code: grpc.StatusCode | None,
    details: str | None,
    metadata: Iterable[tuple[str, str | bytes]],
    socket: str,
    *,
    mid_stream: bool = False,
) -> Failure:
    """The Failure for a call that ended with this status.

    `mid_stream` is true when the call had already delivered replies: then an UNAVAILABLE
    without a reason means that exod went away during the call, not that it was never there.
    """
    reason = reason_of(metadata)
    exit_ = exit_code(reason, code)
    details = (details or "").strip()
    if reason is None and code == grpc.StatusCode.UNAVAILABLE:
        if mid_stream:
            what = "exod went away during the call"
        else:
            exit_, what = _unreachable(details, socket)
    elif details:
        what = details
        if "`" in details:
            # exod already named a command to run; a second hint would only repeat it.
            return Failure(exit_, one_line(what, ""), reason)
    elif reason in REASONS:
        what = REASONS[reason].summary
    else:
        what = f"exod answered {code.name if code else 'an unknown status'}"
    return Failure(exit_, one_line(what, hint(exit_, reason, socket)), reason)


def from_rpc_error(err: grpc.RpcError, socket: str, *, mid_stream: bool = False) -> Failure:
    """The Failure for a gRPC call that raised.

    The errors that gRPC raises for a call are also grpc.Call objects and carry a status; a bare
    RpcError does not, so each part is read only where it exists.
    """
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    trailing = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else ()
    # At run time each item is a namedtuple (key, value); the value is str unless the key ends -bin.
    metadata = [(m.key, m.value) for m in trailing or ()]
    return from_status(code, details, metadata, socket, mid_stream=mid_stream)
