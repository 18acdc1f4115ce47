"""One run delivered over HTTP, whole or as server-sent events; a client that leaves cancels it.

The status line goes out with the first token, not before: until then a failure (the load timed
out, the weights are corrupt, the prompt is too long for the runner) still gets its own status,
as it would without `stream`. After it, a failure is sent as an error event, which OpenAI's
clients raise as an error.

Leaving is noticed whenever it happens: while the run waits in the queue or loads (the request's
`receive` says http.disconnect), or mid-stream (Starlette cancels the body). Either way the run's
items are closed, which cancels the generation in the runner and logs the run as cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from exod.errors import ExoError
from exod.openai import render
from exod.openai.errors import from_exo
from exod.openai.render import Reply
from exod.openai.schema import Parsed
from exod.proto.exo.v1 import control_pb2
from exod.runs import Run, RunItem

log = logging.getLogger(__name__)

T = TypeVar("T")
Output = control_pb2.TokenChunk | control_pb2.RunDone


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


def reply_for(parsed: Parsed, run: Run) -> Reply:
    return Reply(parsed.kind, run.id, int(time.time()), parsed.request.model)


async def until_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Await `work` in this task, cancelling it and raising ClientGone if the client
    disconnects first.

    `work` runs in the caller's own task, so it has started (and opened whatever it consumes)
    before anything can cancel it: a run's items that never started could not cancel the run.
    Only for after the request body was read: from then on `receive` returns nothing but
    http.disconnect.
    """
    me = asyncio.current_task()
    assert me is not None, "called from a task"
    state = {"done": False, "gone": False}

    def on_disconnect(watcher: asyncio.Task[None]) -> None:
        if state["done"] or watcher.cancelled():
            return
        # A receive that failed means the connection is broken: gone all the same.
        if watcher.exception() is not None:
            log.debug("receive failed", exc_info=watcher.exception())
        state["gone"] = True
        me.cancel()

    watcher = asyncio.create_task(_disconnect(receive))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        me.uncancel()  # our own cancel, turned into ClientGone: nobody else asked for it
        raise ClientGone from None
    finally:
        state["done"] = True
        watcher.cancel()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(run: Run) -> tuple[str, control_pb2.RunDone]:
    """The whole text and the RunDone of a run; raises ExoError when it fails."""
    parts = []
    async with aclosing(run.items()) as items:
        async for item in items:
            if isinstance(item, control_pb2.TokenChunk):
                parts.append(item.text)
            elif isinstance(item, control_pb2.RunDone):
                return "".join(parts), item
    raise ExoError("internal", f"run {run.id} ended without finishing")


async def first_output(items: AsyncIterator[RunItem]) -> Output:
    """The first text or RunDone, past load and prefill progress; raises ExoError."""
    async for item in items:
        if not isinstance(item, control_pb2.Progress):
            return item
    raise ExoError("internal", "the run ended without finishing")


class EventStream(StreamingResponse):
    """Server-sent events of one run; the run's items are closed however the response ends."""

    def __init__(
        self,
        reply: Reply,
        first: Output,
        items: AsyncGenerator[RunItem, None],
        usage: bool,
        *,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self._items = items
        self._close = close  # Run.close: cancels the run if the items never ran to the end
        super().__init__(
            events(reply, first, items, usage=usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette cancels the body when the client goes; a body never started (the
            # client went before the status line) would leave the run going without this.
            await self._items.aclose()
            self._close()


async def events(
    reply: Reply, first: Output, items: AsyncIterator[RunItem], *, usage: bool
) -> AsyncGenerator[bytes, None]:
    """The chunks of an answer whose first output is `first`, then [DONE]."""
    if reply.kind == "chat":
        yield render.event(render.chunk(reply, "", first=True))  # the role comes first
    item: RunItem = first
    try:
        while True:
            if isinstance(item, control_pb2.TokenChunk):
                yield render.event(render.chunk(reply, item.text))
            elif isinstance(item, control_pb2.RunDone):
                yield render.event(render.chunk(reply, None, render.finish_reason(item)))
                if usage:
                    yield render.event(render.usage_chunk(reply, item))
                yield render.DONE_EVENT
                return
            item = await anext(items)
    except ExoError as e:
        log.info("run %s failed mid-stream: %s (%s)", reply.run_id, e.reason, e.message)
        yield render.event(from_exo(e).body())
    except StopAsyncIteration:
        yield render.event(from_exo(ExoError("internal", "the run ended unfinished")).body())
