"""Delivering a run over HTTP, with fakes for the client: a disconnect cancels the work and closes
the run's items (which is what cancels the generation), and the events come in OpenAI's order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from exod.errors import ExoError
from exod.openai.render import Reply
from exod.openai.stream import ClientGone, EventStream, events, first_output, until_disconnected
from exod.proto.exo.v1 import control_pb2
from exod.runs import RunItem

CHAT = Reply("chat", "run-1", 1, "demo")
TEXT = Reply("completion", "run-1", 1, "demo")
DONE = control_pb2.RunDone(prompt_tokens=3, generation_tokens=2, stop_reason="length")


class Client:
    """A request's `receive` after its body: nothing until the client disconnects."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


class FakeRun:
    """Items like Run.items(): records whether it was left early (which cancels the run)."""

    def __init__(self, items: list[RunItem | ExoError], hang: bool = False) -> None:
        self._items = items
        self._hang = hang
        self.left_early = False
        self.finished = False

    async def items(self) -> AsyncGenerator[RunItem, None]:
        try:
            for item in self._items:
                await asyncio.sleep(0)
                if isinstance(item, ExoError):
                    self.finished = True
                    raise item
                yield item
            if self._hang:
                await asyncio.Event().wait()
            self.finished = True
        finally:
            if not self.finished:
                self.left_early = True


def test_work_that_ends_first_is_returned() -> None:
    async def main() -> None:
        client = Client()
        run = FakeRun([control_pb2.Progress(phase="weights"), control_pb2.TokenChunk(text="a")])
        item = await until_disconnected(client.receive, first_output(run.items()))
        assert item == control_pb2.TokenChunk(text="a")
        # A disconnect after the answer changes nothing for this task.
        client.gone.set()
        await asyncio.sleep(0.01)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # in a task

    asyncio.run(main())


def test_a_disconnect_cancels_the_work_and_leaves_the_run() -> None:
    async def main() -> None:
        client = Client()
        run = FakeRun([control_pb2.Progress(phase="started")], hang=True)
        items = run.items()
        asyncio.get_running_loop().call_later(0.05, client.gone.set)
        with pytest.raises(ClientGone):
            await until_disconnected(client.receive, first_output(items))
        assert run.left_early
        # The task that handled the request is not left cancelled: it can still answer.
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # in a task
        await asyncio.sleep(0)

    asyncio.run(main())


def test_a_client_gone_before_the_work_started_still_leaves_the_run() -> None:
    async def main() -> None:
        client = Client()
        client.gone.set()  # gone while the run was admitted
        run = FakeRun([], hang=True)
        with pytest.raises(ClientGone):
            await until_disconnected(client.receive, first_output(run.items()))
        assert run.left_early

    asyncio.run(main())


def test_a_failure_of_the_run_is_raised_as_it_is() -> None:
    async def main() -> None:
        run = FakeRun([ExoError("load_timeout", "too slow")])
        with pytest.raises(ExoError, match="too slow"):
            await until_disconnected(Client().receive, first_output(run.items()))
        assert not run.left_early

    asyncio.run(main())


def test_cancelling_the_request_itself_is_not_taken_for_a_disconnect() -> None:
    async def main() -> None:
        run = FakeRun([], hang=True)
        task = asyncio.create_task(until_disconnected(Client().receive, first_output(run.items())))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert run.left_early

    asyncio.run(main())


def collect_events(reply: Reply, first: RunItem, rest: list[RunItem | ExoError]) -> list[Any]:
    async def main() -> list[Any]:
        run = FakeRun(rest)
        assert isinstance(first, control_pb2.TokenChunk | control_pb2.RunDone)
        return [e async for e in events(reply, first, run.items(), usage=True)]

    raw = asyncio.run(main())
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in raw)
    return [e[6:-2].decode() if e[6:-2] == b"[DONE]" else json.loads(e[6:-2]) for e in raw]


def test_chat_events_in_order() -> None:
    got = collect_events(
        CHAT,
        control_pb2.TokenChunk(text="Hel"),
        [control_pb2.Progress(phase="x"), control_pb2.TokenChunk(text="lo"), DONE],
    )
    deltas = [e["choices"][0]["delta"] for e in got[:4]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert got[3]["choices"][0]["finish_reason"] == "length"
    assert got[4]["choices"] == []
    assert got[4]["usage"]["total_tokens"] == 5
    assert got[5] == "[DONE]"
    assert len(got) == 6


def test_completion_events_have_no_role_chunk() -> None:
    got = collect_events(TEXT, control_pb2.TokenChunk(text="Hel"), [DONE])
    assert [e["choices"][0]["text"] for e in got[:2]] == ["Hel", ""]
    assert got[-1] == "[DONE]"


def test_a_failure_mid_stream_is_the_last_event() -> None:
    got = collect_events(
        TEXT, control_pb2.TokenChunk(text="a"), [ExoError("decode_stall", "no token for 60 s")]
    )
    assert got[-1] == {
        "error": {
            "message": "no token for 60 s",
            "type": "server_error",
            "param": None,
            "code": "decode_stall",
        }
    }
    assert "[DONE]" not in got


def test_a_response_that_cannot_be_sent_still_leaves_the_run() -> None:
    async def main() -> None:
        run = FakeRun([control_pb2.TokenChunk(text="b"), DONE])
        items = run.items()
        first = await first_output(items)
        response = EventStream(TEXT, first, items, usage=False)

        async def send(message: Any) -> None:
            raise OSError("the client is gone")

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(ClientDisconnect):
            await response(scope, Client().receive, send)
        assert run.left_early

    asyncio.run(main())
