"""What every command shares: --socket, --json, and the connection they lead to."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from exoctl.arguments import default_socket
from exoctl.client import Client

F = TypeVar("F", bound=Callable[..., Any])


def socket_option(f: F) -> F:
    """--socket, shared by every command so that it can be given after the command's name."""
    return click.option(
        "--socket",
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="PATH",
        envvar="EXOD_SOCKET",
        show_envvar=True,
        help="exod's control socket  [default: exod.sock in EXOD_HOME, else in the state dir]",
    )(f)


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (see docs/cli.md) instead of text."
    )(f)


def connect(socket: Path | None) -> Client:
    path = socket.expanduser().absolute() if socket else default_socket(os.environ)
    return Client(path)
