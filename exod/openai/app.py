"""The routes of the OpenAI-compatible API, and the guard in front of all of them.

    GET  /v1/models               the registered models
    GET  /v1/models/{model}       one of them
    POST /v1/chat/completions     a conversation, with the model's chat template
    POST /v1/completions          a prompt continued as it is

Every request passes the guard first (Host allowlist, then the key), and every POST body must be
JSON, declared as such: a browser can send a cross-site form or text/plain POST without asking
first, but not an application/json one. No CORS header is ever sent, so no other origin can
read an answer. Any failure leaves in OpenAI's error format (exod/openai/errors.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from exod.errors import ExoError
from exod.openai import render
from exod.openai.auth import HostPolicy, key_matches
from exod.openai.errors import HttpError, from_exo
from exod.openai.schema import Parsed, chat_request, completion_request, require_registered
from exod.openai.stream import (
    ClientGone,
    EventStream,
    collect,
    first_output,
    reply_for,
    until_disconnected,
)
from exod.runs import Runs

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"


def build(runs: Runs, hosts: HostPolicy, key: bytes | None, max_body: int) -> ASGIApp:
    api = Api(runs, max_body)
    app = Starlette(
        routes=[
            Route("/v1/models", api.list_models, methods=["GET"]),
            Route("/v1/models/{model}", api.get_model, methods=["GET"]),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
        ],
        exception_handlers={
            HttpError: _http_error,
            ExoError: _exo_error,
            HTTPException: _starlette_error,
            ClientGone: _client_gone,
            Exception: _internal,
        },
    )
    return Guard(app, hosts, key)


class Api:
    def __init__(self, runs: Runs, max_body: int) -> None:
        self._runs = runs
        self._max_body = max_body

    def _registered(self) -> set[str]:
        return set(self._runs.journal.state.models)

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(render.models(self._registered()))

    async def get_model(self, request: Request) -> Response:
        name = str(request.path_params["model"])
        require_registered(name, self._registered())
        return JSONResponse(render.model(name))

    async def chat(self, request: Request) -> Response:
        return await self._run(request, chat_request)

    async def completions(self, request: Request) -> Response:
        return await self._run(request, completion_request)

    async def _run(self, request: Request, parse: Callable[[object], Parsed]) -> Response:
        parsed = parse(await read_json(request, self._max_body))
        require_registered(parsed.request.model, self._registered())
        run = await self._runs.start(parsed.request)
        reply = reply_for(parsed, run)
        if not parsed.stream:
            try:
                text, done = await until_disconnected(request.receive, collect(run))
            finally:
                run.close()
            return JSONResponse(render.completion(reply, text, done))
        items = run.items()
        try:
            first = await until_disconnected(request.receive, first_output(items))
        except BaseException:
            await items.aclose()
            run.close()
            raise
        return EventStream(reply, first, items, parsed.include_usage, close=run.close)


async def read_json(request: Request, max_body: int) -> object:
    """The body as JSON: declared as JSON, at most `max_body` bytes however it is sent."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON_TYPE:
        raise HttpError(
            415, "unsupported_media_type", f"send the body as JSON, with Content-Type: {JSON_TYPE}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and not (declared.isascii() and declared.isdigit()):
        raise HttpError.bad_request(f"Content-Length {declared!r} is not a number")
    # A declared length over the limit is refused before a byte is read; a chunked body (no
    # length) or a lying one is counted as it arrives.
    if declared is not None and int(declared) > max_body:
        raise _too_large(max_body)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise _too_large(max_body)
    except ClientDisconnect:
        raise ClientGone from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting thousands deep
        raise HttpError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def _too_large(max_body: int) -> HttpError:
    return HttpError(
        413,
        "body_too_large",
        f"the body is larger than {max_body} bytes (EXOD_HTTP_MAX_BODY)",
    )


class Guard:
    """Refuses a request whose Host does not name this server, then one without the key."""

    def __init__(self, app: ASGIApp, hosts: HostPolicy, key: bytes | None) -> None:
        self._app = app
        self._hosts = hosts
        self._key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                log.info("refused %s %s: %s", scope["method"], scope["path"], refusal.message)
                await error_response(refusal)(scope, receive, send)
                return
        await self._app(scope, receive, send)

    def refusal(self, scope: Scope) -> HttpError | None:
        hosts = [v for k, v in scope["headers"] if k == b"host"]
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        if not self._hosts.allows(host):
            return HttpError(
                403,
                "host_not_allowed",
                f"Host {host!r} does not name this server: use localhost or 127.0.0.1, or add "
                "the name to EXOD_HTTP_HOSTS",
            )
        if self._key is not None:
            auth = [v for k, v in scope["headers"] if k == b"authorization"]
            if len(auth) != 1 or not key_matches(auth[0], self._key):
                what = "no API key was given" if not auth else "the API key is not valid"
                return HttpError(
                    401,
                    "invalid_api_key",
                    f"{what}: send the key from EXOD_API_KEY_FILE as 'Authorization: Bearer KEY'",
                )
        return None


def error_response(err: HttpError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return error_response(exc)


async def _exo_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ExoError)
    log.info("%s %s failed: %s (%s)", request.method, request.url.path, exc.reason, exc.message)
    return error_response(from_exo(exc))


# The paths build() routes, for the hint a wrong path gets.
PATHS = ("/v1/models", "/v1/models/{model}", "/v1/chat/completions", "/v1/completions")


def no_such_path(path: str) -> HttpError:
    """404 with the path that was probably meant: clients are often given the server's root as
    their base URL, and then ask for /chat/completions."""
    if path.rstrip("/") == "/v1" or path.startswith("/v1/"):
        listed = ", ".join(p for p in PATHS if "{" not in p)
        return HttpError(404, "not_found", f"no such path {path}: the API has {listed}")
    meant = "/v1" + path.rstrip("/")
    known = meant in PATHS or meant.startswith("/v1/models/")
    example = meant if known else "/v1/chat/completions"
    return HttpError(
        404,
        "not_found",
        f"no such path {path}; the API is under /v1, e.g. {example} (an OpenAI client's base "
        "URL ends in /v1)",
    )


async def _starlette_error(request: Request, exc: Exception) -> Response:
    """The router's own answers (no such path, wrong method) in OpenAI's format."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        err = no_such_path(path)
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        err = HttpError(
            405, "method_not_allowed", f"{request.method} {path} is not served; use {allowed}"
        )
    else:
        err = HttpError(exc.status_code, "http_error", str(exc.detail))
    response = error_response(err)
    if exc.headers:
        response.headers.update(exc.headers)  # Allow, for 405
    return response


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody is left to read it; the run was cancelled on the way here.
    return Response(status_code=499)


async def _internal(request: Request, exc: Exception) -> Response:
    # Starlette raises the exception again after this answer, and uvicorn logs it.
    err: dict[str, Any] = HttpError(
        500, "internal", "exod failed to answer; see its log, and report it if it persists"
    ).body()
    return JSONResponse(err, status_code=500)
