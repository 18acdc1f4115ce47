"""Talk to exod's OpenAI-compatible API as clients do: the official `openai` package, plain
HTTP (http.client, for exact statuses and headers), and raw sockets (to drop a connection)."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from tests.daemon import Daemon

# Every test talks to loopback only.
HOST = "127.0.0.1"


def free_port() -> int:
    """A port nobody listens on now (the OS picks it; exod binds it a moment later)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def http_daemon(home: Path, **env: str) -> tuple[Daemon, int]:
    """An exod (not started) whose HTTP API listens on a free loopback port."""
    port = free_port()
    return Daemon.create(home, EXOD_HTTP_PORT=str(port), **env), port


def client(port: int, key: str = "unused", retries: int = 0) -> openai.OpenAI:
    """The official client; no retries unless asked, so that a test sees each status."""
    return openai.OpenAI(
        base_url=f"http://{HOST}:{port}/v1",
        api_key=key,
        max_retries=retries,
        timeout=120,
        # Never a proxy from the environment: the API is on loopback.
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        err: dict[str, Any] = self.json()["error"]
        return err

    def __str__(self) -> str:
        return f"{self.status} {self.headers} {self.body[:500]!r}"


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | object | None = None,
    headers: dict[str, str] | None = None,
    *,
    chunked: bool = False,
) -> Answer:
    """One HTTP request; an object body is sent as JSON with its content type."""
    sent = {"Host": f"{HOST}:{port}"}
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    sent.update(headers or {})
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        if chunked:
            assert isinstance(body, bytes)
            data = body
            pieces = (data[i : i + 65536] for i in range(0, len(data), 65536))
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in {**sent, "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            for piece in pieces:
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return Answer(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


def send_request(port: int, path: str, body: object) -> socket.socket:
    """POST a JSON body on a raw socket, which the test may then close at any moment."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection((HOST, port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock.sendall(head + payload)
    return sock


def open_stream(port: int, path: str, body: object) -> tuple[socket.socket, bytes]:
    """Send a streaming request on a raw socket; return it and what came until the first
    event (the status line, the headers and at least one `data:` line)."""
    sock = send_request(port, path, body)
    received = b""
    while b"\ndata: " not in received:
        data = sock.recv(65536)
        assert data, f"the connection closed early: {received!r}"
        received += data
    return sock, received


def first_event_id(received: bytes) -> str:
    """The `id` of the first event in what open_stream received."""
    line = received.split(b"\ndata: ", 1)[1].split(b"\n", 1)[0]
    event_id: str = json.loads(line)["id"]
    return event_id
