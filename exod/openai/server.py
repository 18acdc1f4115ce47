"""uvicorn serving the OpenAI-compatible API inside exod's own event loop.

Same loop, so a request reaches the runs, the supervisor and the journal without a thread hop
or a lock. exod binds the socket itself (so that a port in use stops it at start with a clear
reason) and keeps its own signal handling and logging: uvicorn gets neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Iterator

import uvicorn

from exod.config import ConfigError, Settings
from exod.errors import Exit
from exod.openai import app
from exod.openai.auth import HostPolicy, host_form, read_key
from exod.runs import Runs

log = logging.getLogger(__name__)

# Seconds the server waits at shutdown for answers still being sent; by then every run has
# ended (exod stops its runners first), so this only covers slow readers.
GRACE_S = 3


class CannotServe(Exception):
    """The HTTP API cannot start; carries the exit code exod should end with."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # exod's loop handles SIGTERM and SIGINT, and stops this server itself.
        yield


class HttpServer:
    """The running server (or none, when EXOD_HTTP_PORT is 0): close it, then wait for it."""

    def __init__(
        self, server: _Server | None = None, task: asyncio.Task[None] | None = None
    ) -> None:
        self._server = server
        self._task = task

    def close(self) -> None:
        """Stop accepting requests; answers in flight go on."""
        if self._server is not None:
            self._server.should_exit = True

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task


async def start(settings: Settings, runs: Runs) -> HttpServer:
    """Serve the API as the settings say; raises CannotServe when that is impossible."""
    if settings.http_port == 0:
        return HttpServer()
    try:
        key = read_key(settings.api_key_file) if settings.api_key_file else None
    except ConfigError as e:
        raise CannotServe(Exit.CONFIG, str(e)) from e
    sock = bind(settings.http_bind, settings.http_port)
    port = sock.getsockname()[1]
    hosts = HostPolicy.for_bind(settings.http_bind, port, settings.http_hosts)
    config = uvicorn.Config(
        app.build(runs, hosts, key, settings.http_max_body),
        http="h11",
        ws="none",
        lifespan="off",
        log_config=None,  # exod configured logging already
        log_level="warning",  # uvicorn's own start and stop lines say nothing exod does not
        access_log=False,
        server_header=False,
        proxy_headers=False,  # nothing sits in front of exod: never trust X-Forwarded-*
        timeout_graceful_shutdown=GRACE_S,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises what stopped it
            raise CannotServe(Exit.INTERNAL, "the HTTP server stopped as it started")
        await asyncio.sleep(0.01)
    url = f"http://{host_form(settings.http_bind)}:{port}/v1"
    log.info("OpenAI-compatible API on %s%s", url, " (API key required)" if key else "")
    return HttpServer(server, task)


def bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return socket.create_server((address, port), family=family)
    except OSError as e:
        where = f"{host_form(address)}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise CannotServe(
                Exit.TEMPFAIL,
                f"cannot serve the HTTP API on {where}: the port is in use (another exod?); "
                "stop that program or set EXOD_HTTP_PORT (0 turns the API off)",
            ) from e
        raise CannotServe(
            Exit.CONFIG,
            f"cannot serve the HTTP API on {where}: {e.strerror or e}; check EXOD_HTTP_BIND "
            "and EXOD_HTTP_PORT",
        ) from e
