"""Framing for the runner pipe: a 4-byte big-endian length, then one serialized protobuf message.

The same framing is spoken by the runner (blocking sockets, one reader thread and several
writers) and by the daemon (asyncio streams), so both flavours live here side by side.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

# A frame carries one message: a prompt, a chunk of text, a progress report. 64 MiB is far above
# any of them, and a length beyond it means the stream is out of step, not that a message is big.
MAX_FRAME = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")

M = TypeVar("M", bound=Message)


class PipeError(Exception):
    """The peer broke the framing: a truncated frame, an oversized length, an undecodable body."""


def encode(msg: Message) -> bytes:
    """One frame: the length of the serialized message, then the message."""
    body = msg.SerializeToString()
    if len(body) > MAX_FRAME:
        raise PipeError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


def _frame_length(header: bytes) -> int:
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise PipeError(f"frame length {length} exceeds the {MAX_FRAME}-byte limit")
    return int(length)


def _decode(cls: type[M], body: bytes) -> M:
    msg = cls()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise PipeError(f"undecodable {cls.__name__} frame: {e}") from e
    return msg


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from sock; fewer only when the peer closed the stream first."""
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_message_sync(sock: socket.socket, cls: type[M]) -> M | None:
    """The next message, or None when the peer closed the stream between frames."""
    header = _recv_exactly(sock, _HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise PipeError("stream ended inside a frame header")
    length = _frame_length(header)
    body = _recv_exactly(sock, length)
    if len(body) < length:
        raise PipeError(f"stream ended after {len(body)} of {length} bytes of a frame")
    return _decode(cls, body)


def write_message_sync(sock: socket.socket, msg: Message, lock: threading.Lock) -> None:
    """Send one frame whole; the lock keeps frames from several threads from interleaving."""
    frame = encode(msg)
    with lock:
        sock.sendall(frame)


async def read_message(reader: asyncio.StreamReader, cls: type[M]) -> M | None:
    """The next message, or None when the peer closed the stream between frames."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise PipeError("stream ended inside a frame header") from e
    length = _frame_length(header)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise PipeError(f"stream ended after {len(e.partial)} of {length} bytes of a frame") from e
    return _decode(cls, body)


async def write_message(writer: asyncio.StreamWriter, msg: Message) -> None:
    """Send one frame and wait until the transport has taken it (back-pressure)."""
    writer.write(encode(msg))
    await writer.drain()
