"""The terminal side of the CLI: printing results and messages, a one-line progress display on
stderr, and a quiet exit when the reader has closed stdout (`exoctl run ... | head -c 10`)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import click


def say(message: str) -> None:
    """One line on stderr, prefixed so that it is clear which program spoke."""
    click.echo(f"exoctl: {message}", err=True)


def print_json(obj: dict[str, Any]) -> None:
    from exoctl import render  # every command imports this module; few print JSON

    click.echo(render.json_line(obj))


def print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        click.echo(line)


# Carriage return, then erase to the end of the line: the line is redrawn in place.
_CLEAR = "\r\x1b[K"


class StatusLine:
    """A single line on stderr that each show() overwrites; it does nothing unless the stream is
    a terminal, so logs and pipes never collect progress noise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        if not self._enabled:
            return
        import shutil  # only a terminal shows progress: a pipe never gets here

        # A line longer than the terminal would wrap, and \r could no longer erase it.
        width = shutil.get_terminal_size().columns - 1
        self._stream.write(_CLEAR + text[:width])
        self._stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._stream.write(_CLEAR)
            self._stream.flush()
            self._shown = False


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null after the reader went away.

    Python flushes stdout once more at exit; with the pipe closed that flush fails and prints a
    traceback. The Python docs' recipe (signal module, "Note on SIGPIPE") is this redirect.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return  # not a real file (tests capture stdout in memory): nothing will fail at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
