"""The runner pipe's framing: what one side writes, the other reads back, or a clear PipeError."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from exod.proto.exo.v1 import runner_pb2
from exod.runners.pipe import (
    MAX_FRAME,
    PipeError,
    encode,
    read_message,
    read_message_sync,
    write_message,
    write_message_sync,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def _generate(prompt: str) -> runner_pb2.ToRunner:
    return runner_pb2.ToRunner(
        generate=runner_pb2.Generate(request_id="r1", prompt=prompt, max_tokens=40)
    )


def test_frame_is_big_endian_length_then_body() -> None:
    msg = _generate("hello")
    body = msg.SerializeToString()
    assert encode(msg) == len(body).to_bytes(4, "big") + body


def test_sync_round_trip_keeps_messages_and_their_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    lock = threading.Lock()
    sent = [_generate("Grüße, 世界 🦊"), runner_pb2.ToRunner(shutdown=runner_pb2.Shutdown())]
    for msg in sent:
        write_message_sync(a, msg, lock)
    assert [read_message_sync(b, runner_pb2.ToRunner) for _ in sent] == sent


def test_empty_message_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    # A message with every field at its default serializes to zero bytes: still one frame.
    a, b = pair
    write_message_sync(a, runner_pb2.Heartbeat(), threading.Lock())
    assert read_message_sync(b, runner_pb2.Heartbeat) == runner_pb2.Heartbeat()


def test_clean_eof_between_frames_reads_none(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    write_message_sync(a, _generate("x"), threading.Lock())
    a.close()
    assert read_message_sync(b, runner_pb2.ToRunner) == _generate("x")
    assert read_message_sync(b, runner_pb2.ToRunner) is None


@pytest.mark.parametrize("cut", [2, 4, 10], ids=["in-header", "after-header", "in-body"])
def test_truncated_frame_is_a_pipe_error(
    pair: tuple[socket.socket, socket.socket], cut: int
) -> None:
    a, b = pair
    a.sendall(encode(_generate("a prompt long enough to cut"))[:cut])
    a.close()
    with pytest.raises(PipeError):
        read_message_sync(b, runner_pb2.ToRunner)


def test_oversized_length_is_refused_without_waiting_for_the_body(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    # Only the header is sent: a reader that trusted the length would wait for 64 MiB forever.
    a.sendall(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(PipeError, match="exceeds"):
        read_message_sync(b, runner_pb2.ToRunner)


def test_a_frame_of_exactly_max_frame_is_accepted() -> None:
    # One byte of tag and four of length precede the text of a 64 MiB string field.
    msg = runner_pb2.Tokens(text="x" * (MAX_FRAME - 5))
    assert len(msg.SerializeToString()) == MAX_FRAME
    assert len(encode(msg)) == MAX_FRAME + 4
    with pytest.raises(PipeError):
        encode(runner_pb2.Tokens(text=msg.text + "x"))


def test_undecodable_body_is_a_pipe_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    garbage = b"\xff\xff\xff"
    a.sendall(len(garbage).to_bytes(4, "big") + garbage)
    with pytest.raises(PipeError, match="undecodable"):
        read_message_sync(b, runner_pb2.ToRunner)


def test_writers_on_several_threads_never_interleave_frames(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    lock = threading.Lock()
    per_thread, threads = 20, 4
    # Large frames, so that one sendall takes several writes and could be split by another.
    big = "y" * 300_000

    def writer(n: int) -> None:
        for i in range(per_thread):
            write_message_sync(a, runner_pb2.Tokens(request_id=f"{n}-{i}", text=big), lock)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    seen = set()
    for _ in range(per_thread * threads):
        msg = read_message_sync(b, runner_pb2.Tokens)
        assert msg is not None and msg.text == big
        seen.add(msg.request_id)
    for w in workers:
        w.join()
    assert len(seen) == per_thread * threads


def _reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_async_reads_what_sync_writes_then_none_at_eof() -> None:
    async def scenario() -> None:
        msgs = [_generate("one"), _generate("twö")]
        reader = _reader_with(b"".join(encode(m) for m in msgs))
        assert await read_message(reader, runner_pb2.ToRunner) == msgs[0]
        assert await read_message(reader, runner_pb2.ToRunner) == msgs[1]
        assert await read_message(reader, runner_pb2.ToRunner) is None

    asyncio.run(scenario())


@pytest.mark.parametrize("cut", [3, 7])
def test_async_truncated_frame_is_a_pipe_error(cut: int) -> None:
    async def scenario() -> None:
        reader = _reader_with(encode(_generate("some prompt"))[:cut])
        with pytest.raises(PipeError):
            await read_message(reader, runner_pb2.ToRunner)

    asyncio.run(scenario())


def test_async_oversized_length_is_a_pipe_error() -> None:
    async def scenario() -> None:
        reader = _reader_with(struct.pack(">I", MAX_FRAME + 1), eof=False)
        with pytest.raises(PipeError, match="exceeds"):
            await asyncio.wait_for(read_message(reader, runner_pb2.ToRunner), timeout=5)

    asyncio.run(scenario())


def test_async_write_reaches_a_sync_reader(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    msg = runner_pb2.FromRunner(done=runner_pb2.Done(request_id="r", stop_reason="stop"))

    async def scenario() -> None:
        a.setblocking(False)
        _, writer = await asyncio.open_connection(sock=a)
        await write_message(writer, msg)
        writer.close()
        await writer.wait_closed()

    asyncio.run(scenario())
    assert read_message_sync(b, runner_pb2.FromRunner) == msg
    assert read_message_sync(b, runner_pb2.FromRunner) is None
