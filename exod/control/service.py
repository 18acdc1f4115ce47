"""The gRPC Control service that exoctl talks to: validates, then hands work to the supervisor.

Every failure leaves as a gRPC status whose trailing metadata names its reason (exod/errors.py);
nothing a client sends can raise past this layer.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from exod import API_VERSION, __version__
from exod.config import Settings
from exod.errors import REASON_KEY, ExoError
from exod.eventlog import Record, RunnerView, StoreError
from exod.journal import Journal
from exod.models.demo import write_demo_model
from exod.models.inspect import content_hash, inspect_model
from exod.models.resolve import resolve_model
from exod.models.tokens import count_prompt_tokens
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc, events_pb2, runner_pb2
from exod.runners import process
from exod.runners.supervisor import Job, Supervisor

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
EVENTS_BATCH = 500


@dataclass(frozen=True)
class Node:
    id: str
    secret: bytes
    started: float


Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def abort(context: grpc.aio.ServicerContext[Req, Resp], err: ExoError) -> NoReturn:
    await context.abort(err.code, err.message, trailing_metadata=((REASON_KEY, err.reason),))
    raise AssertionError("unreachable: abort raises")


def disk_error(e: StoreError) -> ExoError:
    if getattr(e, "disk_full", False):
        return ExoError("disk_full", f"the event log cannot be written, the disk is full: {e}")
    return ExoError("internal", f"the event log cannot be written: {e}")


class ControlService(control_pb2_grpc.ControlServicer):
    def __init__(
        self, node: Node, settings: Settings, journal: Journal, supervisor: Supervisor
    ) -> None:
        self._node = node
        self._settings = settings
        self._journal = journal
        self._supervisor = supervisor

    # --- Run --------------------------------------------------------------------------------------

    async def Run(  # gRPC method names are CamelCase
        self,
        request: control_pb2.RunRequest,
        context: grpc.aio.ServicerContext[control_pb2.RunRequest, control_pb2.RunReply],
    ) -> AsyncIterator[control_pb2.RunReply]:
        try:
            path = await self._admit(request)
        except ExoError as e:
            await abort(context, e)
        run_id = "run-" + secrets.token_hex(4)
        generate = runner_pb2.Generate(
            request_id=run_id,
            prompt=request.prompt,
            raw=request.raw,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            has_seed=request.has_seed,
            seed=request.seed,
            max_prompt_tokens=self._settings.max_prompt_tokens,
        )
        started = control_pb2.RunStarted(run_id=run_id)

        def accept(runner_id: str, position: int) -> None:
            started.runner_id, started.queue_position = runner_id, position
            accepted = events_pb2.RunAccepted(
                run_id=run_id,
                runner_id=runner_id,
                model=request.model,
                prompt_bytes=len(request.prompt.encode()),
                prompt_hmac=self._prompt_hmac(request.prompt),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
            )
            try:
                self._journal.append(events_pb2.Event(run_accepted=accepted))
            except StoreError as e:
                raise disk_error(e) from e

        try:
            job = await self._supervisor.submit(request.model, str(path), run_id, generate, accept)
        except ExoError as e:
            await abort(context, e)
        async for reply in self._stream(job, started, context):
            yield reply

    async def _stream(
        self,
        job: Job,
        started: control_pb2.RunStarted,
        context: grpc.aio.ServicerContext[control_pb2.RunRequest, control_pb2.RunReply],
    ) -> AsyncIterator[control_pb2.RunReply]:
        finished = False
        try:
            yield control_pb2.RunReply(started=started)
            while True:
                item = await job.out.get()
                if isinstance(item, runner_pb2.LoadProgress):
                    progress = control_pb2.Progress(
                        phase=item.phase, current=item.current, total=item.total
                    )
                    yield control_pb2.RunReply(progress=progress)
                elif isinstance(item, runner_pb2.Tokens):
                    if item.text:
                        yield control_pb2.RunReply(tokens=control_pb2.TokenChunk(text=item.text))
                elif isinstance(item, runner_pb2.Done):
                    finished = True
                    self._finish(job.run_id, item.stop_reason, "", item)
                    done = control_pb2.RunDone(
                        prompt_tokens=item.prompt_tokens,
                        generation_tokens=item.generation_tokens,
                        ttft_s=item.ttft_s,
                        tokens_per_s=item.tokens_per_s,
                        stop_reason=item.stop_reason,
                    )
                    yield control_pb2.RunReply(done=done)
                    return
                else:
                    finished = True
                    self._finish(job.run_id, "error", item.reason, None)
                    await abort(context, item)
        finally:
            if not finished:
                # The client went away (Ctrl-C, a dropped stream): stop the work it asked for.
                self._supervisor.cancel(job)
                self._finish(job.run_id, "cancelled", "cancelled", None)

    async def _admit(self, request: control_pb2.RunRequest) -> Path:
        """Everything that can be refused before a runner is spawned."""
        if request.max_tokens < 1:
            raise ExoError(
                "invalid_argument", f"max_tokens must be at least 1, not {request.max_tokens}"
            )
        if not request.temperature >= 0:
            raise ExoError(
                "invalid_argument", f"temperature must be 0 or more, not {request.temperature}"
            )
        if not request.prompt:
            raise ExoError(
                "prompt_empty", "the prompt is empty: give one as an argument or on stdin"
            )
        path = await asyncio.to_thread(resolve_model, request.model, self._journal.state.models)
        files = await asyncio.to_thread(inspect_model, path)
        count = await asyncio.to_thread(count_prompt_tokens, path, request.prompt)
        limit = self._settings.max_prompt_tokens
        if files.context_length:
            limit = min(limit, files.context_length)
        if count is not None and count > limit:
            raise ExoError(
                "prompt_too_long",
                f"the prompt has {count} tokens, more than the {limit} allowed (model context "
                f"{files.context_length or 'unknown'}, EXOD_MAX_PROMPT_TOKENS="
                f"{self._settings.max_prompt_tokens}): shorten it",
            )
        return files.path

    def _finish(
        self, run_id: str, stop_reason: str, reason: str, done: runner_pb2.Done | None
    ) -> None:
        finished = events_pb2.RunFinished(run_id=run_id, stop_reason=stop_reason, reason=reason)
        if done is not None:
            finished.prompt_tokens = done.prompt_tokens
            finished.generation_tokens = done.generation_tokens
            finished.ttft_s = done.ttft_s
            finished.tokens_per_s = done.tokens_per_s
        try:
            self._journal.append(events_pb2.Event(run_finished=finished))
        except StoreError:
            log.exception("could not record the end of run %s", run_id)

    def _prompt_hmac(self, prompt: str) -> str:
        return hmac.new(self._node.secret, prompt.encode(), "sha256").hexdigest()

    # --- Status, Kill -----------------------------------------------------------------------------

    async def Status(  # gRPC method names are CamelCase
        self,
        request: control_pb2.StatusRequest,
        context: grpc.aio.ServicerContext[control_pb2.StatusRequest, control_pb2.StatusReply],
    ) -> control_pb2.StatusReply:
        state = self._journal.state
        views = sorted(state.runners.values(), key=lambda v: v.spawned_at)
        runners = [await self._runner_info(v) for v in views]
        return control_pb2.StatusReply(
            version=__version__,
            api_version=API_VERSION,
            node_id=self._node.id,
            home=str(self._settings.home),
            pid=os.getpid(),
            uptime_s=time.time() - self._node.started,
            runners=runners,
            event_count=state.last_seq,
        )

    async def _runner_info(self, view: RunnerView) -> control_pb2.RunnerInfo:
        info = control_pb2.RunnerInfo(
            id=view.id, model=view.model, model_path=view.model_path, state=view.state, pid=view.pid
        )
        if view.last_error is not None:
            info.last_error.reason = view.last_error.reason
            info.last_error.detail = view.last_error.detail
        live = self._supervisor.runners.get(view.id)
        if live is not None:
            info.state = live.state
            info.queued = len(live.queue)
            if live.state == "ready":
                info.idle_s = time.monotonic() - live.last_used
            info.memory_bytes = await asyncio.to_thread(process.tree_memory, live.pid)
        return info

    async def Kill(  # gRPC method names are CamelCase
        self,
        request: control_pb2.KillRequest,
        context: grpc.aio.ServicerContext[control_pb2.KillRequest, control_pb2.KillReply],
    ) -> control_pb2.KillReply:
        try:
            if request.all == bool(request.runner_id):
                raise ExoError("invalid_argument", "give either a runner id or --all")
            ids = list(self._supervisor.runners) if request.all else [request.runner_id]
            if not request.all and request.runner_id not in self._supervisor.runners:
                known = self._journal.state.runners.get(request.runner_id)
                detail = f" (it is {known.state})" if known else ""
                raise ExoError(
                    "runner_not_found",
                    f"no runner {request.runner_id} is running{detail}: see `exoctl status`",
                )
            await asyncio.gather(*(self._supervisor.kill(i) for i in ids))
        except ExoError as e:
            await abort(context, e)
        return control_pb2.KillReply(killed=ids)

    # --- Events -----------------------------------------------------------------------------------

    async def Events(  # gRPC method names are CamelCase
        self,
        request: control_pb2.EventsRequest,
        context: grpc.aio.ServicerContext[control_pb2.EventsRequest, control_pb2.EventRecord],
    ) -> AsyncIterator[control_pb2.EventRecord]:
        if request.since < 0 or request.limit < 0:
            await abort(
                context, ExoError("invalid_argument", "since and limit must not be negative")
            )
        since, sent = request.since, 0
        while True:
            batch = self._journal.store.read(since, EVENTS_BATCH)
            for record in batch:
                yield record_to_proto(record)
                since, sent = record.seq, sent + 1
                if request.limit and sent >= request.limit:
                    return
            if len(batch) == EVENTS_BATCH:
                continue
            if not request.follow:
                return
            await self._journal.wait_beyond(since)

    # --- Models -----------------------------------------------------------------------------------

    async def Models(  # gRPC method names are CamelCase
        self,
        request: control_pb2.ModelsRequest,
        context: grpc.aio.ServicerContext[control_pb2.ModelsRequest, control_pb2.ModelsReply],
    ) -> control_pb2.ModelsReply:
        try:
            return await self._models(request)
        except ExoError as e:
            await abort(context, e)
        except StoreError as e:
            await abort(context, disk_error(e))

    async def _models(self, request: control_pb2.ModelsRequest) -> control_pb2.ModelsReply:
        action = request.action
        if action == control_pb2.ModelsRequest.LIST:
            models = sorted(self._journal.state.models.values(), key=lambda m: m.name)
            return control_pb2.ModelsReply(
                models=[
                    control_pb2.ModelInfo(name=m.name, path=m.path, content_hash=m.content_hash)
                    for m in models
                ]
            )
        name = request.name or ("demo" if action == control_pb2.ModelsRequest.DEMO else "")
        if not MODEL_NAME.fullmatch(name):
            raise ExoError(
                "invalid_argument",
                f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' or '-' "
                "(up to 64, starting with a letter or digit)",
            )
        if action == control_pb2.ModelsRequest.REMOVE:
            if name not in self._journal.state.models:
                raise ExoError(
                    "model_not_found",
                    f"no registered model named {name!r}: see `exoctl models list`",
                )
            self._journal.append(events_pb2.Event(model_removed=events_pb2.ModelRemoved(name=name)))
            return control_pb2.ModelsReply()
        if action == control_pb2.ModelsRequest.DEMO:
            path = self._settings.home / "models" / name
            if not (path / "config.json").exists():
                await asyncio.to_thread(write_demo_model, path)
        elif action == control_pb2.ModelsRequest.ADD:
            path = Path(request.path)
            if not path.is_absolute():
                raise ExoError(
                    "invalid_argument", f"model directory {request.path!r} must be an absolute path"
                )
        else:
            raise ExoError("invalid_argument", f"unknown models action {action}")
        files = await asyncio.to_thread(inspect_model, path)
        digest = await asyncio.to_thread(content_hash, files.path)
        added = events_pb2.ModelAdded(name=name, path=str(files.path), content_hash=digest)
        self._journal.append(events_pb2.Event(model_added=added))
        return control_pb2.ModelsReply(
            models=[control_pb2.ModelInfo(name=name, path=str(files.path), content_hash=digest)]
        )


def record_to_proto(record: Record) -> control_pb2.EventRecord:
    ts = Timestamp()
    ts.FromNanoseconds(int(record.ts * 1e9))
    return control_pb2.EventRecord(
        seq=record.seq,
        origin=record.origin,
        origin_seq=record.origin_seq,
        ts=ts,
        kind=record.kind,
        event=record.event,
    )
