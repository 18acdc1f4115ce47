"""Runs of this node that a member's runner makes: the calling side of the peer call Generate.

Two kinds of runner elsewhere take this node's runs (instances.py decides which, from the plan):
rank 0 of an instance this node coordinates with its rank 0 on a member (or its whole model
there: an instance of one rank), over that rank's lease channel; and a runner a member runs for
its own clients whose model has the same content, over a channel of the run's own. Either way
the member admits the run as its own and streams the runner's replies back; `start` turns them
into a Job like a local runner's, so the run path above (exod/runs.py, gRPC and HTTP streaming)
is the same. The member's side is rank_host.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from exod.cluster import tls_store
from exod.cluster.peer_server import endpoint, peer_channel
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.errors import ExoError, from_peer
from exod.eventlog.fold import MemberView
from exod.proto.exo.v1 import peer_pb2, peer_pb2_grpc, runner_pb2
from exod.runners.handle import Job

GenerateCall = grpc.aio.UnaryStreamCall[peer_pb2.GenerateRequest, peer_pb2.GenerateReply]
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True)
class Target:
    """A member's runner that this node's runs of a model are queued on."""

    member: MemberView
    # An instance's rank 0, over its lease channel; its end (once it has ended) is why its
    # runs ended, whatever the member's stream said.
    instance_id: str = ""
    channel: grpc.aio.Channel | None = None
    ended: Callable[[], ExoError | None] = lambda: None
    # Or a runner of the member's own, by its model's content hash, over a channel per run.
    content_hash: str = ""
    material: tls_store.Material | None = None


async def start(
    target: Target, generate: runner_pb2.Generate
) -> tuple[peer_pb2.GenerateStarted, Job, asyncio.Task[None]]:
    """Queue a run on the target's runner: how it started there, the job its replies arrive on,
    and the task that relays them (cancel it to end the run; the member ends it then)."""
    member = target.member
    request = peer_pb2.GenerateRequest(
        protocol_version=PROTOCOL_VERSION,
        instance_id=target.instance_id,
        content_hash=target.content_hash,
        generate=generate,
    )
    owned = None if target.channel is not None else _channel(target)
    channel = target.channel or owned
    assert channel is not None  # one of the two
    call = peer_pb2_grpc.PeerStub(channel).Generate(request)
    replies = aiter(call)
    try:
        first = await anext(replies)
    except BaseException as e:
        if owned is not None:
            await owned.close(grace=None)
        if isinstance(e, grpc.aio.AioRpcError):
            raise _failure(target, e) from None
        if isinstance(e, StopAsyncIteration):
            raise ExoError("rank_failed", f"node {member.id} ended the run at once") from None
        raise
    job = Job(run_id=generate.request_id, request=generate)
    relay = asyncio.create_task(_relay(target, call, replies, job, owned))
    return first.started, job, relay


def _channel(target: Target) -> grpc.aio.Channel:
    member = target.member
    if target.material is None or not member.addresses:
        raise ExoError(
            "peer_unreachable",
            f"this node cannot reach node {member.id}: start exod there and let it reach this "
            "node, then retry",
        )
    return peer_channel(target.material, member.id, endpoint(member.addresses[0], member.port))


async def _relay(
    target: Target,
    call: GenerateCall,
    replies: AsyncIterator[peer_pb2.GenerateReply],
    job: Job,
    owned: grpc.aio.Channel | None,
) -> None:
    """The member's replies onto `job`, as a local runner's reader puts them, until the end."""
    member = target.member.id
    try:
        async for reply in replies:
            which = reply.WhichOneof("msg")
            if which == "progress":
                job.out.put_nowait(reply.progress)
            elif which == "tokens":
                job.out.put_nowait(reply.tokens)
            elif which == "done":
                job.finish(reply.done)
                return
        job.finish(ExoError("rank_failed", f"node {member} ended the run before its end"))
    except grpc.aio.AioRpcError as e:
        job.finish(_failure(target, e))
    except asyncio.CancelledError:
        call.cancel()  # the member ends the run
        job.finish(ExoError("cancelled", "cancelled"))
        raise
    finally:
        if owned is not None:
            await owned.close(grace=None)


def _failure(target: Target, e: grpc.aio.AioRpcError) -> ExoError:
    """Why a run on a member's runner ended: its instance's end when that has ended (which
    closes the call), else the member's reason as it gave it."""
    ended = target.ended()
    if ended is not None:
        return ended
    member = target.member.id
    return from_peer(
        e,
        f"node {member} failed the run",
        refused=e.details() or "",
        gone=_GONE,
        unreachable=f"node {member}, which runs this model, went away mid-run: retry once it is "
        "back",
        unimplemented=f"node {member} runs an earlier exod that cannot take this node's runs: "
        "upgrade exod there",
    )
