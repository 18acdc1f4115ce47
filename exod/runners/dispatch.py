"""A runner's traffic: what it says goes to the job it names, and queued jobs go to it while they
fit.

The runner batches up to EXOD_PARALLEL generations; every Tokens, Done, RunnerError and prefill
LoadProgress carries its request id, which is the job's run id. The job at the head of the queue
is sent as soon as fewer than EXOD_PARALLEL run and its memory reservation fits beside theirs
(admission.may_start); jobs start in the order they came, so a large one is never passed over for
ever by small ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from exod import RUNNER_PROTOCOL_VERSION
from exod.config import Settings
from exod.errors import ExoError
from exod.journal import Journal
from exod.proto.exo.v1 import events_pb2, runner_pb2
from exod.runners import admission, pipe
from exod.runners.handle import Runner, record

log = logging.getLogger(__name__)

# Messages that prove a runner is moving, for any of its requests: a batch that makes progress
# for anyone is not stalled. Heartbeats do not count: a runner wedged inside C++ can still run
# its heartbeat thread.
PROGRESS = frozenset({"hello", "progress", "ready", "tokens", "done", "error"})


def need_of(request: runner_pb2.Generate, kv_bytes_per_token: int) -> int:
    """The memory a generation reserves (admission.reservation), from what the supervisor sees:
    the prompt's bytes bound its tokens (no tokenizer here)."""
    text = request.prompt.encode() if not request.messages else b""
    size = len(text) + sum(len(m.content.encode()) for m in request.messages)
    tokens = admission.prompt_tokens_bound(size, len(request.messages), request.max_prompt_tokens)
    return admission.reservation(tokens, request.max_tokens, kv_bytes_per_token)


def occupancy(runner: Runner, settings: Settings) -> admission.Occupancy:
    return admission.Occupancy(
        cap=settings.max_runner_memory,
        model=runner.model_memory,
        measured=runner.memory,
        reserved=runner.reserved,
        active=len(runner.active),
        parallel=settings.parallel,
    )


# --- from the runner -----------------------------------------------------------------------------


async def read(
    runner: Runner, settings: Settings, journal: Journal, stop: Callable[[Runner, str], None]
) -> None:
    """Route every message of the runner until its pipe ends."""
    started = time.monotonic()
    try:
        while (msg := await pipe.read_message(runner.reader, runner_pb2.FromRunner)) is not None:
            route(runner, msg, started=started, settings=settings, journal=journal, stop=stop)
    except (pipe.PipeError, ConnectionError) as e:
        log.warning("runner %s pipe broke: %s", runner.id, e)


def route(
    runner: Runner,
    msg: runner_pb2.FromRunner,
    *,
    started: float,
    settings: Settings,
    journal: Journal,
    stop: Callable[[Runner, str], None],
) -> None:
    which = msg.WhichOneof("msg")
    if which in PROGRESS:
        runner.last_progress = time.monotonic()
    if which == "hello":
        runner.hello = msg.hello
        if msg.hello.protocol_version != RUNNER_PROTOCOL_VERSION:
            runner.load_error = ExoError(
                "internal",
                f"runner speaks protocol {msg.hello.protocol_version}, exod speaks "
                f"{RUNNER_PROTOCOL_VERSION}: reinstall exod so both come from one version",
            )
            stop(runner, "crashed")
    elif which == "heartbeat":
        runner.heartbeat = msg.heartbeat
    elif which == "progress":
        _on_progress(runner, msg.progress)
    elif which == "ready":
        _on_ready(runner, msg.ready, started, journal)
        start_fitting(runner, settings)
    elif which == "tokens":
        job = runner.active.get(msg.tokens.request_id)
        if job is not None:
            job.decoding = True
            job.out.put_nowait(msg.tokens)
    elif which == "done":
        _end_job(runner, msg.done.request_id, msg.done)
        start_fitting(runner, settings)
    elif which == "error":
        err = ExoError(msg.error.reason or "internal", msg.error.message)
        if not msg.error.request_id:
            runner.load_error = err  # the load failed; the runner exits next
        else:
            _end_job(runner, msg.error.request_id, err)
            start_fitting(runner, settings)


def _on_progress(runner: Runner, progress: runner_pb2.LoadProgress) -> None:
    """Prefill progress belongs to the job it names; load progress to every job waiting."""
    if progress.phase == "prefill":
        job = runner.active.get(progress.request_id)
        if job is not None:
            job.out.put_nowait(progress)
    else:
        for job in runner.queue:
            job.out.put_nowait(progress)


def _on_ready(runner: Runner, ready: runner_pb2.Ready, started: float, journal: Journal) -> None:
    if ready.kv_bytes_per_token > 0:  # the loaded model's own figure beats the config's
        runner.kv_bytes_per_token = ready.kv_bytes_per_token
    if runner.ending is None:
        runner.state = "ready"
    runner.last_used = runner.ready_at = time.monotonic()
    event = events_pb2.RunnerReady(runner_id=runner.id, load_s=time.monotonic() - started)
    record(journal, runner, events_pb2.Event(runner_ready=event))


def _end_job(runner: Runner, request_id: str, item: runner_pb2.Done | ExoError) -> None:
    """A generation left the batch: free its place and reservation for the queue."""
    job = runner.active.pop(request_id, None)
    if job is None:
        return
    job.finish(item)
    if not runner.active:
        runner.last_used = time.monotonic()  # the idle TTL counts from the last job's end
        if runner.state == "running":
            runner.state = "ready"


# --- to the runner -------------------------------------------------------------------------------


def start_fitting(runner: Runner, settings: Settings) -> None:
    """Move queued jobs into the runner's batch while they fit, and send each its Generate.

    Synchronous, so that whoever changes what fits (a job queued or ended, the load done, a
    memory sample) starts what now fits at once, and a queue position counted right after is
    exact. The Generates go out in order (send_soon keeps the order it is called in).
    """
    if runner.ready_at is None:
        return  # loading: everything waits for Ready
    while runner.queue and runner.ending is None:
        job = runner.queue[0]
        need = need_of(job.request, runner.kv_bytes_per_token)
        try:
            # Checked again with what the loaded runner says of itself (its own KV size, its
            # measured memory), which may differ from what admission estimated.
            if not job.force:
                admission.check_alone(need, runner.model_memory, settings.max_runner_memory)
        except ExoError as e:
            runner.queue.popleft()
            job.finish(e)
            continue
        if not admission.may_start(occupancy(runner, settings), need):
            return
        runner.queue.popleft()
        job.reservation = need
        if not runner.active:
            runner.last_progress = time.monotonic()  # quiet while idle is no stall
        runner.active[job.run_id] = job
        runner.state = "running"
        runner.send_soon(runner_pb2.ToRunner(generate=job.request))
