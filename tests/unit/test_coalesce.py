"""A slow client gets what waits for it coalesced: the same text in fewer chunks, never later."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from exod.errors import ExoError
from exod.proto.exo.v1 import control_pb2, runner_pb2
from exod.runners.supervisor import Job, JobItem
from exod.runs import Run, Runs, coalesce, drain


def tokens(text: str, count: int = 1) -> runner_pb2.Tokens:
    return runner_pb2.Tokens(request_id="run-1", text=text, count=count)


def progress(current: int) -> runner_pb2.LoadProgress:
    return runner_pb2.LoadProgress(phase="prefill", current=current, total=10)


DONE = runner_pb2.Done(request_id="run-1", stop_reason="length", cached_tokens=7)


def test_neighbouring_tokens_become_one_chunk() -> None:
    got = coalesce([tokens("Hel", 1), tokens("lo", 2), tokens(" wor", 1), DONE])
    assert got == [runner_pb2.Tokens(request_id="run-1", text="Hello wor", count=4), DONE]


def test_only_the_newest_of_neighbouring_progress_stays() -> None:
    assert coalesce([progress(1), progress(5), progress(9), tokens("a")]) == [
        progress(9),
        tokens("a"),
    ]


def test_order_and_kinds_are_kept() -> None:
    items: list[JobItem] = [progress(1), tokens("a"), progress(2), tokens("b"), tokens("c")]
    assert coalesce(items) == [progress(1), tokens("a"), progress(2), tokens("bc", 2)]


def test_one_item_and_none_pass_through() -> None:
    assert coalesce([tokens("x")]) == [tokens("x")]
    assert coalesce([]) == []
    failure = ExoError("decode_stall", "no token")
    assert coalesce([tokens("a"), failure]) == [tokens("a"), failure]


def test_the_inputs_are_not_changed() -> None:
    first = tokens("a")
    coalesce([first, tokens("b")])
    assert first.text == "a"


def test_drain_takes_what_waits_without_waiting() -> None:
    async def main() -> list[JobItem]:
        queue: asyncio.Queue[JobItem] = asyncio.Queue()
        for text in "bc":
            queue.put_nowait(tokens(text))
        got = drain(queue, tokens("a"))
        assert queue.empty()
        return got

    assert asyncio.run(main()) == [tokens("a"), tokens("b"), tokens("c")]


class FakeRuns:
    """What Run needs of Runs: a supervisor to cancel with, and a log of finished runs."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []
        self.supervisor = self

    def cancel(self, job: Job) -> None:
        self.finished.append((job.run_id, "cancel sent"))

    def finish(self, run_id: str, stop_reason: str, reason: str, done: Any) -> None:
        self.finished.append((run_id, stop_reason))


def run_of(job: Job, runs: FakeRuns) -> Run:
    return Run("run-1", "r-1", 0, job, cast(Runs, runs))


def test_a_reader_that_falls_behind_gets_the_backlog_as_one_chunk() -> None:
    async def main() -> list[Any]:
        job = Job("run-1", runner_pb2.Generate(request_id="run-1"))
        runs = FakeRuns()
        run = run_of(job, runs)
        items = run.items()
        job.out.put_nowait(tokens("first"))
        # The first token goes out alone, at once: nothing waits to be joined to it.
        got: list[Any] = [await anext(items)]
        for text in ["a", "b", "c"]:
            job.out.put_nowait(tokens(text))
        job.finish(DONE)
        got += [item async for item in items]
        assert runs.finished == [("run-1", "length")]
        return got

    got = asyncio.run(main())
    assert got == [
        control_pb2.TokenChunk(text="first"),
        control_pb2.TokenChunk(text="abc"),
        control_pb2.RunDone(stop_reason="length", cached_tokens=7),
    ]
