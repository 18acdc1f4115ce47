"""The gRPC Control service that exoctl talks to: validates, then hands work to the supervisor.

Every failure leaves as a gRPC status whose trailing metadata names its reason (exod/errors.py);
nothing a client sends can raise past this layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
from google.protobuf.timestamp_pb2 import Timestamp

from exod import API_VERSION, __version__, runs
from exod.cluster.control import Cluster
from exod.cluster.instances import Instances
from exod.cluster.placement import Plan
from exod.errors import ExoError, abort
from exod.eventlog import Record, RunnerView, StoreError
from exod.models import MODEL_NAME_PATTERN
from exod.models.demo import write_demo_model
from exod.models.importer import TRASH_PREFIX, Importer
from exod.models.inspect import content_hash, inspect_model
from exod.models.resolve import resolve_model
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc, events_pb2
from exod.runners import process
from exod.runs import Runs, store_failure
from exod.service import firewall, localnet
from exod.service.localnet import LocalNetwork

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
EVENTS_BATCH = 500


@dataclass(frozen=True)
class Node:
    id: str
    started: float
    localnet: LocalNetwork
    cluster: Cluster
    instances: Instances


Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")


async def answered(context: grpc.aio.ServicerContext[Req, Resp], call: Awaitable[T]) -> T:
    """The call's reply; its failure as the gRPC status that exoctl maps to an exit code."""
    try:
        return await call
    except ExoError as e:
        await abort(context, e)
    except StoreError as e:
        await abort(context, store_failure(e))


class ControlService(control_pb2_grpc.ControlServicer):
    def __init__(self, node: Node, runs: Runs) -> None:
        self._node = node
        self._runs = runs
        self._settings = runs.settings
        self._journal = runs.journal
        self._supervisor = runs.supervisor
        self._importer = Importer(runs.settings, runs.journal, runs.supervisor)
        self._firewall = firewall.Firewall()
        self._planner = node.instances.planner

    async def shutdown(self) -> None:
        """exod is stopping: end the imports in flight (runs end with the supervisor)."""
        await self._importer.shutdown()

    # --- Run --------------------------------------------------------------------------------------

    async def Run(  # gRPC method names are CamelCase
        self,
        request: control_pb2.RunRequest,
        context: grpc.aio.ServicerContext[control_pb2.RunRequest, control_pb2.RunReply],
    ) -> AsyncIterator[control_pb2.RunReply]:
        # A split model's start may send its weights to members first: its progress is told
        # while the run is started.
        told: asyncio.Queue[control_pb2.Progress] = asyncio.Queue()
        starting = asyncio.ensure_future(self._runs.start(request, told.put_nowait))
        run: runs.Run | None = None
        try:
            async for progress in _told_until(starting, told):
                yield control_pb2.RunReply(progress=progress)
            run = starting.result()
        except ExoError as e:
            await abort(context, e)
        finally:
            if run is None:
                _drop(starting)
        started = control_pb2.RunStarted(
            run_id=run.id, runner_id=run.runner_id, queue_position=run.queue_position
        )
        try:
            yield control_pb2.RunReply(started=started)
            async with aclosing(run.items()) as items:
                async for item in items:
                    if isinstance(item, control_pb2.Progress):
                        yield control_pb2.RunReply(progress=item)
                    elif isinstance(item, control_pb2.TokenChunk):
                        yield control_pb2.RunReply(tokens=item)
                    else:
                        yield control_pb2.RunReply(done=item)
        except ExoError as e:
            await abort(context, e)
        finally:
            run.close()  # a client gone before the first item still cancels its run

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
            node_name=self._settings.node_name,
            home=str(self._settings.home),
            pid=os.getpid(),
            uptime_s=time.time() - self._node.started,
            runners=runners,
            event_count=state.last_seq,
            warnings=await self._warnings(),
            cluster=self._node.cluster.info(),
            nodes=[self._self_node(), *self._node.cluster.replication.nodes(time.time())],
            instances=self._node.instances.view(),
        )

    def _self_node(self) -> control_pb2.NodeInfo:
        memory = psutil.virtual_memory()
        return control_pb2.NodeInfo(
            id=self._node.id,
            name=self._settings.node_name,
            addresses=self._node.cluster.addresses(),
            state="self",
            memory_free_bytes=memory.available,
            memory_total_bytes=memory.total,
            runners=len(self._supervisor.runners),
        )

    async def _warnings(self) -> list[control_pb2.Warning]:
        warnings = []
        if self._node.localnet.denied:
            warnings.append(control_pb2.Warning(code=localnet.CONDITION, message=localnet.ADVICE))
        # Read in a thread, at most once a minute, only on macOS and only in a cluster.
        blocked = await self._firewall.warning(self._node.cluster.info() is not None)
        if blocked is not None:
            warnings.append(control_pb2.Warning(code=firewall.CONDITION, message=blocked))
        forked = self._node.cluster.replication.forked
        if forked:
            warnings.append(control_pb2.Warning(code="copied_home", message=forked))
        warnings.extend(self._node.cluster.warnings(time.time()))
        return warnings

    async def _runner_info(self, view: RunnerView) -> control_pb2.RunnerInfo:
        info = control_pb2.RunnerInfo(
            id=view.id,
            model=view.model,
            model_path=view.model_path,
            state=view.state,
            end_reason=view.end_reason,
        )
        if view.last_error is not None:
            info.last_error.reason = view.last_error.reason
            info.last_error.detail = view.last_error.detail
        if view.ended_at is not None:
            info.ended_at.FromNanoseconds(int(view.ended_at * 1e9))
        live = self._supervisor.runners.get(view.id)
        if live is None and view.state in ("spawning", "ready"):
            # Its end could not be logged (a full disk): it is gone all the same.
            info.state = "stopped"
        if live is not None:
            # Only a live runner has a pid: an ended one's may belong to another process by now.
            info.pid = view.pid
            info.state = live.state
            info.queued = len(live.queue)
            info.active = len(live.active)
            if live.hello is not None:
                info.mlx_pid = live.hello.pid  # the runner under the shim (pid), where MLX runs
            beat = live.heartbeat
            if beat is not None:
                info.prompt_cache_bytes = beat.prompt_cache_bytes
                if beat.prompt_tokens > 0:
                    info.prompt_cache_hit_rate = beat.cached_prompt_tokens / beat.prompt_tokens
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
            if request.runner_id.startswith("i-"):
                await self._node.instances.kill(request.runner_id)
                return control_pb2.KillReply(killed=[request.runner_id])
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
        origin = request.node or None
        while True:
            # Noted before the read: with --node most records may be of other origins, and the
            # wait below must not return at once for them again and again.
            seen = self._journal.state.last_seq
            store = self._journal.store
            batch = (
                store.read(since, EVENTS_BATCH)
                if origin is None
                else store.read_of(origin, since, EVENTS_BATCH)
            )
            for record in batch:
                yield record_to_proto(record)
                since, sent = record.seq, sent + 1
                if request.limit and sent >= request.limit:
                    return
            if len(batch) == EVENTS_BATCH:
                continue
            if not request.follow:
                return
            await self._journal.wait_beyond(max(since, seen))

    # --- Cluster ----------------------------------------------------------------------------------

    async def ClusterInit(  # gRPC method names are CamelCase
        self,
        request: control_pb2.ClusterInitRequest,
        context: grpc.aio.ServicerContext[control_pb2.ClusterInitRequest, control_pb2.ClusterReply],
    ) -> control_pb2.ClusterReply:
        return await answered(context, self._node.cluster.init())

    async def ClusterInvite(  # gRPC method names are CamelCase
        self,
        request: control_pb2.ClusterInviteRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.ClusterInviteRequest, control_pb2.ClusterInviteReply
        ],
    ) -> control_pb2.ClusterInviteReply:
        return await answered(context, self._node.cluster.invite(request.ttl_s))

    async def ClusterJoin(  # gRPC method names are CamelCase
        self,
        request: control_pb2.ClusterJoinRequest,
        context: grpc.aio.ServicerContext[control_pb2.ClusterJoinRequest, control_pb2.ClusterReply],
    ) -> control_pb2.ClusterReply:
        return await answered(context, self._node.cluster.join(request.token))

    async def ClusterRemove(  # gRPC method names are CamelCase
        self,
        request: control_pb2.ClusterRemoveRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.ClusterRemoveRequest, control_pb2.ClusterRemoveReply
        ],
    ) -> control_pb2.ClusterRemoveReply:
        return await answered(context, self._node.cluster.remove(request.node_id))

    async def ClusterLeave(  # gRPC method names are CamelCase
        self,
        request: control_pb2.ClusterLeaveRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.ClusterLeaveRequest, control_pb2.ClusterReply
        ],
    ) -> control_pb2.ClusterReply:
        return await answered(context, self._node.cluster.leave())

    # --- Place ------------------------------------------------------------------------------------

    async def Place(  # gRPC method names are CamelCase
        self,
        request: control_pb2.PlaceRequest,
        context: grpc.aio.ServicerContext[control_pb2.PlaceRequest, control_pb2.PlaceReply],
    ) -> control_pb2.PlaceReply:
        return await answered(context, self._place(request))

    async def _place(self, request: control_pb2.PlaceRequest) -> control_pb2.PlaceReply:
        """The plan for a model, found as `run` finds it, over this node and the members it
        reaches now; a model that cannot be found or read fails as `run` fails."""
        forced = list(request.on)
        if any(not node for node in forced):
            raise ExoError("invalid_argument", "an empty node id in --on: give node ids")
        path = await asyncio.to_thread(resolve_model, request.model, self._journal.state.models)
        files = await asyncio.to_thread(inspect_model, path)
        members = await self._planner.members()
        plan = await self._planner.plan(files, forced, members)
        return _plan_reply(request.model, plan, {m.id: m.name for m in members})

    # --- Models -----------------------------------------------------------------------------------

    async def Models(  # gRPC method names are CamelCase
        self,
        request: control_pb2.ModelsRequest,
        context: grpc.aio.ServicerContext[control_pb2.ModelsRequest, control_pb2.ModelsReply],
    ) -> control_pb2.ModelsReply:
        return await answered(context, self._models(request))

    async def _models(self, request: control_pb2.ModelsRequest) -> control_pb2.ModelsReply:
        action = request.action
        if action == control_pb2.ModelsRequest.LIST:
            models = sorted(self._journal.state.models.values(), key=lambda m: m.name)
            return control_pb2.ModelsReply(
                models=[
                    control_pb2.ModelInfo(
                        name=m.name,
                        path=m.path,
                        content_hash=m.content_hash,
                        owned=m.owned,
                        stop=m.stop,
                    )
                    for m in models
                ]
            )
        self._journal.check_writable("change its models")
        name = request.name or ("demo" if action == control_pb2.ModelsRequest.DEMO else "")
        if not MODEL_NAME.fullmatch(name):
            raise ExoError(
                "invalid_argument",
                f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' or '-' "
                "(up to 64, starting with a letter or digit)",
            )
        if action == control_pb2.ModelsRequest.REMOVE:
            return await self._remove(name)
        if action == control_pb2.ModelsRequest.DEMO:
            path = self._settings.home / "models" / name
            # Checked before writing a model that would then not be registered.
            self._check_name_free(request, name, path)
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
        # Checked again after the awaits, right before the append: another call may have taken
        # the name meanwhile.
        self._check_name_free(request, name, files.path)
        # The demo's directory is exod's own, like an import's: `models rm` deletes it.
        owned = action == control_pb2.ModelsRequest.DEMO
        added = events_pb2.ModelAdded(
            name=name, path=str(files.path), content_hash=digest, owned=owned
        )
        self._journal.append(events_pb2.Event(model_added=added))
        return control_pb2.ModelsReply(
            models=[
                control_pb2.ModelInfo(
                    name=name, path=str(files.path), content_hash=digest, owned=owned
                )
            ]
        )

    async def _remove(self, name: str) -> control_pb2.ModelsReply:
        """Forget a name; delete its directory when exod wrote it (an import, the demo) and no
        other name uses it. A directory the user added is never touched."""
        models = self._journal.state.models
        old = models.get(name)
        if old is None:
            raise ExoError(
                "model_not_found", f"no registered model named {name!r}: see `exoctl models list`"
            )
        path = Path(old.path)
        ours = self._settings.home / "models"
        shared = any(m.path == old.path for m in models.values() if m.name != name)
        delete = old.owned and path.parent == ours and not shared
        delete = delete and await asyncio.to_thread(path.is_dir)
        removed = events_pb2.Event(model_removed=events_pb2.ModelRemoved(name=name))
        if not delete:
            self._journal.append(removed)
            return control_pb2.ModelsReply(
                models=[control_pb2.ModelInfo(name=name, path=old.path, owned=False)]
            )
        # Moved aside first, so that the entry and the directory go together: if the removal
        # cannot be logged, the directory is put back; a trash dir left by a crash is removed at
        # the next start (Importer._remove_strays).
        trash = ours / f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
        try:
            await asyncio.to_thread(path.rename, trash)
        except OSError as e:
            raise ExoError(
                "permission_denied" if isinstance(e, PermissionError) else "internal",
                f"cannot delete {path}: {e.strerror or e}; nothing was removed",
            ) from None
        try:
            self._journal.append(removed)
        except StoreError:
            await asyncio.to_thread(trash.rename, path)
            raise
        await asyncio.to_thread(shutil.rmtree, trash, True)
        return control_pb2.ModelsReply(
            models=[control_pb2.ModelInfo(name=name, path=old.path, owned=True)]
        )

    # --- Import -----------------------------------------------------------------------------------

    async def Import(  # gRPC method names are CamelCase
        self,
        request: control_pb2.ImportRequest,
        context: grpc.aio.ServicerContext[control_pb2.ImportRequest, control_pb2.ImportReply],
    ) -> AsyncIterator[control_pb2.ImportReply]:
        try:
            self._journal.check_writable("import a model")
            async with aclosing(self._importer.run(request)) as replies:
                async for reply in replies:
                    yield reply
        except ExoError as e:
            await abort(context, e)
        except StoreError as e:
            await abort(context, store_failure(e))

    def _check_name_free(self, request: control_pb2.ModelsRequest, name: str, path: Path) -> None:
        """Refuse to move a name to another directory unless asked to (force): a typo in
        `models add` must not silently replace a model that scripts run by name. Registering a
        name again to the same directory is harmless, and refreshes its content hash."""
        old = self._journal.state.models.get(name)
        if old is None or request.force or old.path == str(path):
            return
        if request.action == control_pb2.ModelsRequest.DEMO:
            replace = f"`exoctl models demo --name {name} --force`"
            other = "another name with `exoctl models demo --name NAME`"
        else:
            replace = f"`exoctl models add {name} {shlex.quote(str(path))} --force`"
            other = "another name"
        raise ExoError(
            "invalid_argument",
            f"the name {name!r} is already registered to {old.path}: choose {other}, or "
            f"replace it with {replace}",
        )


def _plan_reply(model: str, plan: Plan, names: dict[str, str]) -> control_pb2.PlaceReply:
    reply = control_pb2.PlaceReply(model=model, whole_on=plan.whole_on or "")
    for r in plan.ranks:
        reply.ranks.add(
            rank=r.rank,
            node=r.node,
            node_name=names.get(r.node, ""),
            first_layer=r.first_layer,
            last_layer=r.last_layer,
            bytes=r.bytes,
        )
    if plan.refused is not None:
        reply.refused.reason = plan.refused.reason
        reply.refused.message = plan.refused.message
    return reply


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


async def _told_until(work: asyncio.Future[runs.Run], told: asyncio.Queue[T]) -> AsyncIterator[T]:
    """What is put on `told` until `work` is done."""
    while not work.done():
        telling = asyncio.ensure_future(told.get())
        try:
            await asyncio.wait((work, telling), return_when=asyncio.FIRST_COMPLETED)
        finally:
            telling.cancel()
        if telling.done() and not telling.cancelled():
            yield telling.result()
        while not told.empty():
            yield told.get_nowait()


def _drop(starting: asyncio.Future[runs.Run]) -> None:
    """A run whose client left while it was started: cancelled, or closed once made."""
    if not starting.done():
        starting.cancel()
    elif not starting.cancelled() and starting.exception() is None:
        starting.result().close()
