"""`exoctl run`: follow one generation's reply stream and put each reply where it belongs.

Tokens go to stdout as they arrive, so a pipe sees them at once; everything else (where the run
is queued, load progress) goes to stderr and only to a terminal. The exit code tells how the run
ended; --json adds one line per chunk and a final done or error line for scripts.
"""

from __future__ import annotations

from typing import BinaryIO

import grpc

from exoctl import interrupt, render
from exoctl.client import Client, cancel
from exoctl.failures import Failure, hint, one_line
from exoctl.interrupt import Ending
from exoctl.terminal import StatusLine
from exod.errors import Exit
from exod.proto.exo.v1 import control_pb2


class RunOutput:
    """Writes a generation's replies: text or JSON lines on stdout, progress on stderr."""

    def __init__(self, stdout: BinaryIO, status: StatusLine, *, as_json: bool) -> None:
        self._stdout = stdout
        self._status = status
        self._json = as_json
        self._mid_line = False  # plain text written and not yet ended by a newline

    def _write(self, data: str) -> None:
        # Bytes, so that the text is UTF-8 whatever the locale says; flushed, so a reader
        # sees each chunk as soon as it is generated.
        self._stdout.write(data.encode("utf-8"))
        self._stdout.flush()

    def _line(self, obj: dict[str, object]) -> None:
        self._write(render.json_line(obj) + "\n")

    def reply(self, reply: control_pb2.RunReply) -> bool:
        """Handle one reply; True when it was the final `done`."""
        which = reply.WhichOneof("msg")
        if which == "started":
            self._status.show(render.started_text(reply.started))
        elif which == "progress":
            self._status.show(render.progress_text(reply.progress))
        elif which == "tokens":
            self._status.clear()
            if self._json:
                self._line(render.token_json(reply.tokens.text))
            elif reply.tokens.text:
                self._write(reply.tokens.text)
                self._mid_line = True
        elif which == "done":
            self._status.clear()
            if self._json:
                self._line(render.done_json(reply.done))
            else:
                self._write("\n")
                self._mid_line = False
            return True
        # A kind of reply from a newer exod is skipped: it cannot change what we print.
        return False

    def ending(self, failure: Failure) -> bytes:
        """What stdout still needs when the run ends with `failure`."""
        if self._json:
            obj = render.error_json(failure.reason, failure.message, int(failure.code))
            return (render.json_line(obj) + "\n").encode()
        # The shell's prompt should not start after half a sentence.
        return b"\n" if self._mid_line else b""

    def failed(self, failure: Failure) -> None:
        """End the output for a run that failed (the one stderr line is printed by the CLI)."""
        self._status.clear()
        try:
            self._stdout.write(self.ending(failure))
            self._stdout.flush()
        except BrokenPipeError:
            pass  # nobody reads stdout any more; the exit code still says what happened


# How a run ends on Ctrl-C: exod sees the connection close and cancels it (exoctl/interrupt.py).
CANCELLED = Failure(
    Exit.INTERRUPTED, "interrupted; the generation was cancelled.", reason="cancelled"
)


def generate(client: Client, request: control_pb2.RunRequest, out: RunOutput) -> None:
    """Run one generation to its end; raise Failure unless it finished.

    Ctrl-C ends exoctl at once with 130, and closing the connection cancels the generation in
    exod. A closed stdout cancels the call, then lets BrokenPipeError through for the quiet
    exit 0.
    """
    on_ctrl_c = Ending(message=CANCELLED.message, stdout=lambda: out.ending(CANCELLED))
    received = False
    done = False
    with interrupt.ending(on_ctrl_c):
        call = client.run(request)
        try:
            for reply in call:
                received = True
                done = out.reply(reply) or done
        except BrokenPipeError:
            cancel(call)
            raise
        except grpc.RpcError as e:
            if not done:  # after `done` the output is complete; a late error changes nothing
                raise client.failure(e, mid_stream=received) from None
    if not done:
        raise Failure(
            Exit.UNAVAILABLE,
            one_line(
                "exod ended the run without finishing it",
                hint(Exit.UNAVAILABLE, None, str(client.socket)),
            ),
        )
