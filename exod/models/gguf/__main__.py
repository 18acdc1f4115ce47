"""`python -m exod.models.gguf SRC DEST`: the conversion subprocess that exod supervises.

stdout carries JSON lines only: progress lines
    {"tensors_done": 3, "tensors_total": 272, "bytes_done": 1048576, "bytes_total": 96576768}
(at most a few a second, and always one at the end), then one final line, either
    {"done": "DEST", "content_hash": "<sha256 hex>"}
or
    {"error": "<reason from exod.errors.REASONS>", "message": "<what is wrong and what to do>"}.
A failure's message is also the one line on stderr. The exit code is the reason's (65 cannot
convert: unknown architecture or type, garbled or truncated file; 66 file not found; 77
unreadable; 75 no disk room; 64 bad arguments or an existing DEST; 130 interrupted by SIGINT or
SIGTERM). However it ends, DEST is either complete or absent, and no staging directory is left.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings
from pathlib import Path
from types import FrameType
from typing import NoReturn

from exod.errors import REASONS, Exit, ExoError

PROGRESS_INTERVAL = 0.25


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{message} (usage: python -m exod.models.gguf SRC.gguf DEST)")


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _fail(reason: str, message: str, code: int) -> int:
    _emit({"error": reason, "message": message})
    print(f"error: {message}", file=sys.stderr)
    return code


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through convert, which removes its staging directory


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m exod.models.gguf",
        description="Convert a GGUF file (or the first part of a split set) into an MLX model "
        "directory; progress and the result as JSON lines on stdout.",
    )
    parser.add_argument("src", type=Path, help="the .gguf file")
    parser.add_argument("dest", type=Path, help="the model directory to create")
    try:
        args = parser.parse_args(argv)
    except _Usage as e:
        return _fail("invalid_argument", str(e), Exit.USAGE)
    signal.signal(signal.SIGTERM, _terminate)
    # numpy warns on stderr about odd values (a NaN scale in a damaged file): stderr is for
    # the one line that says what failed.
    warnings.simplefilter("ignore")

    from exod.models.gguf.convert import Progress, convert

    last = 0.0

    def progress(p: Progress) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL or p.tensors_done == p.tensors_total:
            last = now
            _emit(
                {
                    "tensors_done": p.tensors_done,
                    "tensors_total": p.tensors_total,
                    "bytes_done": p.bytes_done,
                    "bytes_total": p.bytes_total,
                }
            )

    try:
        digest = convert(args.src, args.dest, progress=progress)
    except ExoError as e:
        return _fail(e.reason, e.message, REASONS[e.reason].exit)
    except KeyboardInterrupt:
        return _fail("cancelled", "the import was interrupted; nothing was kept", Exit.INTERRUPTED)
    except BrokenPipeError:
        return Exit.INTERRUPTED  # whoever read the progress is gone; nothing is kept
    except Exception as e:  # a bug: still one line, and the reason says so
        message = " ".join(f"{type(e).__name__}: {e}".split())
        return _fail("internal", f"the import failed unexpectedly ({message})", Exit.INTERNAL)
    _emit({"done": str(args.dest), "content_hash": digest})
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
