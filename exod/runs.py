"""A run: one generation, from admission to its RunFinished event, whoever asked for it.

The gRPC Control service and the OpenAI HTTP endpoint both go through here, so validation,
limits, the queue and the log are the same for every client. A run's items are consumed with
`async with aclosing(run.items())`, with `run.close()` in a `finally`: leaving early (a dropped
client, a stop sequence) cancels the generation in the runner and logs the run as cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from exod.cluster import member_runs
from exod.cluster.instances import Instances, Progress
from exod.config import Settings
from exod.errors import ExoError
from exod.eventlog import StoreError
from exod.journal import Journal
from exod.models.inspect import ModelFiles, inspect_model
from exod.models.resolve import resolve_model
from exod.models.tokens import count_prompt_tokens
from exod.proto.exo.v1 import control_pb2, events_pb2, runner_pb2
from exod.runners import admission
from exod.runners.supervisor import Job, JobItem, Supervisor
from exod.service.awake import KeepAwake

log = logging.getLogger(__name__)

RunItem = control_pb2.Progress | control_pb2.TokenChunk | control_pb2.RunDone
ROLES = frozenset({"system", "user", "assistant"})


def store_failure(e: StoreError) -> ExoError:
    if e.disk_full:
        return ExoError("disk_full", f"the event log cannot be written, the disk is full: {e}")
    return ExoError("internal", f"the event log cannot be written: {e}")


def check_request(request: control_pb2.RunRequest) -> None:
    """What can be refused from the request alone (pure)."""
    if request.max_tokens < 1:
        raise ExoError(
            "invalid_argument", f"max_tokens must be at least 1, not {request.max_tokens}"
        )
    if not request.temperature >= 0:
        raise ExoError(
            "invalid_argument", f"temperature must be 0 or more, not {request.temperature}"
        )
    for message in request.messages:
        if message.role not in ROLES:
            raise ExoError(
                "invalid_argument",
                f"message role {message.role!r} is not one of {', '.join(sorted(ROLES))}",
            )
    if not request.messages and not request.prompt:
        raise ExoError("prompt_empty", "the prompt is empty: give one as an argument or on stdin")
    if any(not s for s in request.stop):
        raise ExoError("invalid_argument", "a stop sequence must not be empty")


def coalesce(items: Sequence[JobItem]) -> list[JobItem]:
    """What already waits for a client, as few items as it says the same (pure).

    Neighbouring Tokens become one (text joined, counts summed), and a LoadProgress followed by
    another keeps only the newer: a client slower than the model then gets fewer, bigger
    chunks instead of a backlog of tiny ones, and the text is the same byte for byte. Only what
    already waits is merged, so the first token is never held back to wait for a second.
    """
    out: list[JobItem] = []
    for item in items:
        last = out[-1] if out else None
        if isinstance(item, runner_pb2.Tokens) and isinstance(last, runner_pb2.Tokens):
            out[-1] = runner_pb2.Tokens(
                request_id=last.request_id,
                text=last.text + item.text,
                count=last.count + item.count,
            )
        elif isinstance(item, runner_pb2.LoadProgress) and isinstance(
            last, runner_pb2.LoadProgress
        ):
            out[-1] = item
        else:
            out.append(item)
    return out


def drain(queue: asyncio.Queue[JobItem], first: JobItem) -> list[JobItem]:
    """`first`, then everything already waiting in `queue`, without waiting for more."""
    items = [first]
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def prompt_text(request: control_pb2.RunRequest) -> str:
    """The text whose tokens count against the limits (the chat template adds a few more)."""
    if request.messages:
        return "\n".join(m.content for m in request.messages)
    return request.prompt


# How long the end of a run whose client left is awaited (the runner drops it between two steps).
CANCEL_WAIT_S = 5.0


@dataclass
class Run:
    id: str
    runner_id: str
    queue_position: int
    job: Job
    runs: Runs
    finished: bool = False
    instance: str = ""  # the split model's instance whose rank 0 runs it (empty: whole)
    # What relays the replies of rank 0 on a member (None: the runner is this node's).
    relay: asyncio.Task[None] | None = None

    def close(self) -> None:
        """Cancel the run unless it has ended; safe to call any number of times.

        Callers call it in a `finally`: an items() generator that was never started does not run
        its own `finally` when closed, so it cannot be the only guard.
        """
        if not self.finished:
            # The consumer left (Ctrl-C, a dropped stream): stop the work it asked for.
            self.finished = True
            if self.relay is not None:
                self.relay.cancel()  # the member ends the run
            else:
                self.runs.supervisor.cancel(self.job)
            self.runs.finish_cancelled(self.id, self.job)

    async def items(self) -> AsyncGenerator[RunItem, None]:
        """Progress, text chunks, then RunDone; raises ExoError when the run fails.

        Each wait takes everything the runner has sent meanwhile, coalesced: the supervisor's
        queue is unbounded, so a slow or stopped client never holds up the runner, and when it
        reads again it gets the backlog as one chunk rather than token by token.
        """
        try:
            while True:
                waiting = drain(self.job.out, await self.job.out.get())
                for item in coalesce(waiting):
                    done = self._item(item)
                    if done is not None:
                        yield done
                    if self.finished:
                        return
        finally:
            self.close()

    def _item(self, item: JobItem) -> RunItem | None:
        """The client's form of one runner item (None: nothing to send); ends the run on Done,
        raises its ExoError on failure."""
        if isinstance(item, runner_pb2.LoadProgress):
            return control_pb2.Progress(phase=item.phase, current=item.current, total=item.total)
        if isinstance(item, runner_pb2.Tokens):
            return control_pb2.TokenChunk(text=item.text) if item.text else None
        self.finished = True
        if isinstance(item, runner_pb2.Done):
            self.runs.finish(self.id, item.stop_reason, "", item)
            return control_pb2.RunDone(
                instance=self.instance,
                prompt_tokens=item.prompt_tokens,
                generation_tokens=item.generation_tokens,
                ttft_s=item.ttft_s,
                tokens_per_s=item.tokens_per_s,
                stop_reason=item.stop_reason,
                cached_tokens=item.cached_tokens,
            )
        self.runs.finish(self.id, "error", item.reason, None)
        raise item


class Runs:
    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        supervisor: Supervisor,
        secret: bytes,
        awake: KeepAwake | None = None,
        *,
        instances: Instances | None = None,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.supervisor = supervisor
        self._secret = secret
        # Told of each run where it is logged as accepted and as finished: every end goes there.
        self.awake = awake if awake is not None else KeepAwake(None)
        # Where a model split over members is started (none: every model runs whole here).
        self.instances = instances
        self._ending: set[asyncio.Task[None]] = set()  # cancelled runs awaiting their end

    async def start(
        self, request: control_pb2.RunRequest, progress: Progress = lambda _: None
    ) -> Run:
        """Admit a run and queue it on its model's runner; raises ExoError when refused.
        `progress` hears how the start of a split model goes (weights sent to members)."""
        self.journal.check_writable("accept runs")
        files = await self._admit(request)
        elsewhere = None
        if self.instances is not None:
            # --on places it; else a model that fits here runs whole here as ever, and one
            # that does not goes where the plan says (a member's runner, or a split).
            elsewhere = await self.instances.ensure(
                request.model, files, list(request.on), progress
            )
        # --force skips the estimate, never the cap: the supervisor still enforces that.
        need = None if request.force else admission.estimate(files.weight_bytes)
        run_id = "run-" + secrets.token_hex(4)
        generate = runner_pb2.Generate(
            request_id=run_id,
            prompt=request.prompt,
            raw=request.raw,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            has_seed=request.has_seed,
            seed=request.seed,
            max_prompt_tokens=self.settings.max_prompt_tokens,
            messages=request.messages,
            stop=request.stop or self._default_stop(request.model),
        )
        placed: list[tuple[str, int]] = []

        def accept(runner_id: str, position: int) -> None:
            text = prompt_text(request)
            accepted = events_pb2.RunAccepted(
                run_id=run_id,
                runner_id=runner_id,
                model=request.model,
                prompt_bytes=len(text.encode()),
                prompt_hmac=hmac.new(self._secret, text.encode(), "sha256").hexdigest(),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
            )
            try:
                self.journal.append(events_pb2.Event(run_accepted=accepted))
            except StoreError as e:
                raise store_failure(e) from e
            self.awake.run_started(run_id)
            placed.append((runner_id, position))

        if elsewhere is not None:
            # A member's runner runs it (an instance's rank 0, or its own): queued there.
            started, job, relay = await member_runs.start(elsewhere, generate)
            try:
                accept(started.runner_id, started.queue_position)
            except BaseException:
                relay.cancel()
                raise
            return Run(
                run_id,
                started.runner_id,
                started.queue_position,
                job,
                self,
                instance=elsewhere.instance_id,
                relay=relay,
            )
        try:
            job = await self.supervisor.submit(
                request.model, str(files.path), run_id, generate, accept, need=need
            )
        except StoreError as e:  # RunnerSpawned could not be logged; the runner is gone again
            raise store_failure(e) from e
        runner_id, position = placed[0]
        runner = self.supervisor.runners.get(runner_id)
        instance = runner.instance if runner is not None else ""
        return Run(run_id, runner_id, position, job, self, instance=instance)

    def _default_stop(self, model: str) -> list[str]:
        """The stop sequences registered with a model (an Ollama import's), for runs that give
        none of their own."""
        registered = self.journal.state.models.get(model)
        return list(registered.stop) if registered is not None else []

    async def _admit(self, request: control_pb2.RunRequest) -> ModelFiles:
        """Everything that can be refused before a runner is spawned."""
        check_request(request)
        path = await asyncio.to_thread(resolve_model, request.model, self.journal.state.models)
        files = await asyncio.to_thread(inspect_model, path)
        count = await asyncio.to_thread(count_prompt_tokens, path, prompt_text(request))
        limit = self.settings.max_prompt_tokens
        if files.context_length:
            limit = min(limit, files.context_length)
        if count is not None and count > limit:
            raise ExoError(
                "prompt_too_long",
                f"the prompt has {count} tokens, more than the {limit} allowed (model context "
                f"{files.context_length or 'unknown'}, EXOD_MAX_PROMPT_TOKENS="
                f"{self.settings.max_prompt_tokens}): shorten it",
            )
        return files

    def finish_cancelled(self, run_id: str, job: Job) -> None:
        """Log the end of a run whose client left once its runner has let it go, so that the
        log says how many tokens it made; after CANCEL_WAIT_S without that, without them."""

        async def when_done() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.finished.wait(), CANCEL_WAIT_S)
            done = None
            while not job.out.empty():
                item = job.out.get_nowait()
                if isinstance(item, runner_pb2.Done):
                    done = item
            self.finish(run_id, "cancelled", "cancelled", done)

        task = asyncio.get_running_loop().create_task(when_done())
        self._ending.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._ending.discard)

    def finish(
        self, run_id: str, stop_reason: str, reason: str, done: runner_pb2.Done | None
    ) -> None:
        self.awake.run_ended(run_id)
        finished = events_pb2.RunFinished(run_id=run_id, stop_reason=stop_reason, reason=reason)
        if done is not None:
            finished.prompt_tokens = done.prompt_tokens
            finished.generation_tokens = done.generation_tokens
            finished.ttft_s = done.ttft_s
            finished.tokens_per_s = done.tokens_per_s
        try:
            self.journal.append(events_pb2.Event(run_finished=finished))
        except StoreError:
            log.exception("could not record the end of run %s", run_id)
