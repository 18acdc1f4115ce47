"""The receiving side of the peer calls HasModel and PushModel: a member sends this node a model
directory (a rank's part of a split model) for its model cache.

The caller's certificate was checked before any of this runs (peer_server.CertificateCheck).
The first message is the manifest: checked whole (paths, sizes, its key) before room is made for
it; a key held already is answered at once, its chunks unread. Files are written and hashed as
they arrive (exod/models/receive.py); on any refusal, and when the sender hangs up, what was
written is deleted. The sender writes only when told to (PushModelReply in peer.proto), so that
a refusal reaches it as the member gave it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from exod.cluster.protocol import PROTOCOL_VERSION, check_version
from exod.errors import ExoError
from exod.models.cache import ModelCache
from exod.models.manifest import KEY, Manifest, ManifestFile, check_manifest
from exod.models.receive import Receiver
from exod.proto.exo.v1 import peer_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


def manifest_of(message: peer_pb2.ModelManifest, receiving: str) -> tuple[str, Manifest]:
    """(key, manifest) from a push's first message; weights_corrupt saying why it cannot be."""
    files = [ManifestFile(f.path, f.size, f.sha256) for f in message.files]
    why = check_manifest(message.key, files)
    if why is not None:
        raise ExoError(
            "weights_corrupt",
            f"{receiving}: its manifest cannot be taken, as {why}; nothing was written",
        )
    return message.key, Manifest(tuple(sorted(files, key=lambda f: f.path)))


def has(cache: ModelCache, request: peer_pb2.HasModelRequest) -> peer_pb2.HasModelReply:
    check_version(request.protocol_version, "the sending node")
    if not KEY.fullmatch(request.key):
        raise ExoError("invalid_argument", f"{request.key[:80]!r} is not a model's content key")
    return peer_pb2.HasModelReply(protocol_version=PROTOCOL_VERSION, have=cache.has(request.key))


async def receive(
    cache: ModelCache, requests: AsyncIterator[peer_pb2.ModelChunk], sender: str
) -> AsyncIterator[peer_pb2.PushModelReply]:
    """Take one pushed model into the cache from `sender` (a node id), answering as
    PushModelReply says; ExoError when it is refused (nothing kept). A refusal raised here
    always finds the sender waiting for an answer, not writing (see peer.proto)."""
    yield _reply()  # taken: send the manifest
    first = await anext(requests, None)
    if first is None or not first.HasField("manifest"):
        raise ExoError(
            "invalid_argument",
            f"node {cache.node_id} refused a model from node {sender}: its first message was "
            "not the manifest; nothing was written",
        )
    check_version(first.protocol_version, f"node {sender}")
    shown = first.manifest.key[:16]
    receiving = f"node {cache.node_id} refused model {shown}… from node {sender}"
    key, manifest = manifest_of(first.manifest, receiving)
    if await asyncio.to_thread(cache.has, key):
        yield _reply(had=True)
        return
    reserving = _in_thread(cache.reserve, key, manifest.total)
    try:
        incoming = await _settled(reserving)
    except asyncio.CancelledError:
        # The sender hung up while the directory was being made: it must not stay behind.
        if reserving.exception() is None:
            reserving.result().abort()
        raise
    receiver = Receiver(incoming.path, manifest, receiving)
    try:
        yield _reply(ready=True)
        await _write(receiver, requests, receiving)
        await _settled(_in_thread(incoming.commit))
    except ExoError:
        receiver.close()
        incoming.abort()
        # The sender may be writing: it is told to stop, and the call ends only once it has
        # half-closed, so that its client reports this refusal and not a failed write.
        yield _reply(stop=True)
        async for _ in requests:
            pass
        raise
    except BaseException:
        # The sender hung up (the call is cancelled): nothing half-written stays.
        receiver.close()
        incoming.abort()
        raise
    log.info(
        "received model %s from node %s: %d files, %d bytes",
        shown,
        sender,
        len(manifest.files),
        receiver.received,
    )
    yield _reply(bytes_received=receiver.received)


async def _write(
    receiver: Receiver, requests: AsyncIterator[peer_pb2.ModelChunk], receiving: str
) -> None:
    """Every chunk through `receiver`, then its last checks. One chunk is written and hashed in
    a thread while the next one is read off the stream; when this ends, no write is going (the
    cleanup that follows must not delete under one)."""
    writing: asyncio.Future[None] | None = None
    try:
        async for chunk in requests:
            if not chunk.HasField("data"):
                raise ExoError("invalid_argument", f"{receiving}: it sent a second manifest")
            if writing is not None:
                await _settled(writing)
            data = chunk.data
            writing = _in_thread(receiver.write, data.path, data.offset, data.data)
        if writing is not None:
            await _settled(writing)
        await _settled(_in_thread(receiver.finish))
    except BaseException:
        if writing is not None:
            await asyncio.wait({writing})
            writing.exception()  # retrieved: an error of it is not the one that ends the call
        raise


def _reply(
    *, had: bool = False, ready: bool = False, stop: bool = False, bytes_received: int = 0
) -> peer_pb2.PushModelReply:
    return peer_pb2.PushModelReply(
        protocol_version=PROTOCOL_VERSION,
        had=had,
        ready=ready,
        stop=stop,
        bytes_received=bytes_received,
    )


def _in_thread(work: Callable[..., T], *args: object) -> asyncio.Future[T]:
    return asyncio.ensure_future(asyncio.to_thread(work, *args))


async def _settled(work: asyncio.Future[T]) -> T:
    """What the thread's work returned. When the call is cancelled meanwhile (the sender hung
    up), the thread is waited for before the cancellation goes on: the cleanup that follows
    must not race a write still going (a file made after the directory was deleted, a
    descriptor closed under it)."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait({work})
        raise
