"""Ctrl-C: one line on stderr and exit 130 at once, whatever exoctl is doing at that moment.

Python's default turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to
be. grpc's synchronous API is not safe against that: raised inside its iterator it can leave a
lock half-released ("cannot release un-acquired lock"), and a second Ctrl-C that lands while the
first is being handled can leave the main thread waiting forever in the channel's `__del__`. A
KeyboardInterrupt during the imports prints a traceback. So SIGINT never raises in exoctl: the
handler installed first thing in `__main__` writes what is owed to stdout and the one line to
stderr, and ends the process. The kernel then closes the control socket, and exod cancels the call
on it exactly as for an explicit cancel (gRPC cancels every stream of a closed connection), so the
generation stops in the daemon too.

Nothing here may block or raise: it runs between any two bytecodes of the main thread, perhaps
inside a write to the same stream.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

# Exit.INTERRUPTED; spelled out because exod.errors imports grpc, and this module must be ready
# before anything slow is imported.
INTERRUPTED = 130


@dataclass(frozen=True)
class Ending:
    """How exoctl ends on Ctrl-C in the current phase of a command."""

    code: int = INTERRUPTED
    message: str | None = "interrupted."  # None: nothing on stderr (ending --follow is success)
    stdout: Callable[[], bytes] = bytes  # what stdout still needs, e.g. the end of a half line


# The innermost phase's ending is the one in force; the bottom one is for everything else.
_endings: list[Ending] = [Ending()]

# Set by the first Ctrl-C; a later one finds it and leaves the ending to the first.
_ending_now = False


def install() -> None:
    """Route SIGINT to the handler below; called before anything slow is imported."""
    signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def ending(end: Ending) -> Iterator[None]:
    """Within the block, Ctrl-C ends exoctl as `end` says."""
    _endings.append(end)
    try:
        yield
    finally:
        _endings.pop()


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # a closed pipe or terminal: nobody is there to tell
        while data:
            data = data[os.write(fd, data) :]


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    # A second Ctrl-C runs this again, between two bytecodes of the first call. Either it finds
    # the flag and returns, or it came before the flag was set and ends exoctl itself, and the
    # first call never resumes: the line is written once. The handler is never switched to
    # SIG_IGN instead: a second Ctrl-C that CPython has already noted but not yet handled when
    # the switch lands is reported as "OSError: Signal 2 ignored due to race condition" with a
    # traceback on stderr (seen in CI, once in about forty double Ctrl-Cs on a loaded machine).
    global _ending_now  # noqa: PLW0603  # one flag, set once, read by the next call
    if _ending_now:
        return
    _ending_now = True
    end = _endings[-1]
    # What the command wrote and flushed is out already; this pushes out the rest. It fails
    # harmlessly (reentrant call, closed pipe) when the signal landed inside a write.
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        _write_all(1, end.stdout())
    if end.message is not None:
        # On a terminal the line starts after the "^C" it echoed, and after any progress line.
        start = b"\r\x1b[K" if _isatty(2) else b""
        _write_all(2, start + f"exoctl: {end.message}\n".encode())
    elif _isatty(2):
        _write_all(2, b"\n")  # end the line that the terminal's ^C started
    os._exit(end.code)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
