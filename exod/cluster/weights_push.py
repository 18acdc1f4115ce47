"""Sending a model directory to a member over mutual TLS: the sending side of the peer calls
HasModel and PushModel (the receiving side is weights_receive.py).

The directory's manifest (every file's size and full SHA-256) gives its content key; the member
is asked first whether it holds that key, and only if not is the directory streamed: the
manifest, then each file in order, in chunks of 1 MiB. The member verifies every byte as it
comes (exod/models/receive.py) and keeps it in its model cache under the key. A rank's part of a
model is written out first (exod/runners/partial.py: its layers' tensors, the shared ones,
config and tokenizer), so that a member receives only what its rank needs.

The member is found as the CA's node is (ca_client.py): at each of its addresses in turn until
one answers within EXOD_PEER_TIMEOUT, its certificate naming its id. A push that moves no byte
for STALL_PEER_TIMEOUTS peer timeouts is ended (a member that hangs with its connection open).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from exod.cluster import tls_store
from exod.cluster.peer_server import endpoint, peer_channel
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.errors import ExoError, from_peer
from exod.eventlog.fold import MemberView
from exod.models.manifest import Manifest, manifest_of
from exod.proto.exo.v1 import peer_pb2, peer_pb2_grpc
from exod.runners.partial import write_partial

CHUNK = 1 << 20  # the most one message carries (the receiver refuses more)
STALL_PEER_TIMEOUTS = 3
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

# (bytes sent, bytes in all): called after each chunk, and once with (total, total) when the
# member held the model already.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Pushed:
    key: str
    total: int  # bytes of the directory
    sent: int  # bytes streamed: 0 when the member held it already
    had: bool


class _Sent:
    """What a push streamed so far, and when it last moved."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.bytes = 0
        self.total = total
        self.moved = time.monotonic()
        self._progress = progress

    def add(self, n: int) -> None:
        self.bytes += n
        self.moved = time.monotonic()
        if self._progress is not None:
            self._progress(self.bytes, self.total)


async def chunks(
    directory: Path, manifest: Manifest, sent: Callable[[int], None] = lambda _: None
) -> AsyncIterator[peer_pb2.ModelChunk]:
    """A push's messages: the manifest, then every file's bytes in order. `sent(n)` after each
    chunk is handed on."""
    yield peer_pb2.ModelChunk(
        protocol_version=PROTOCOL_VERSION,
        manifest=peer_pb2.ModelManifest(
            key=manifest.key,
            files=[
                peer_pb2.ModelFile(path=f.path, size=f.size, sha256=f.sha256)
                for f in manifest.files
            ],
        ),
    )
    for file in manifest.files:
        offset = 0
        with directory.joinpath(*file.path.split("/")).open("rb") as f:
            while offset < file.size:
                data = await asyncio.to_thread(f.read, min(CHUNK, file.size - offset))
                if not data:
                    raise ExoError(
                        "model_unreadable",
                        f"{directory / file.path} ended at {offset} of its {file.size} bytes "
                        "while it was sent: it changed since it was hashed; send it again",
                    )
                yield peer_pb2.ModelChunk(
                    data=peer_pb2.ModelData(path=file.path, offset=offset, data=data)
                )
                offset += len(data)
                sent(len(data))


async def read_manifest(directory: Path) -> Manifest:
    """The directory's manifest (every byte read once); model_unreadable when it cannot be."""
    try:
        return await asyncio.to_thread(manifest_of, directory)
    except (OSError, ValueError) as e:
        raise ExoError(
            "model_unreadable",
            f"cannot read the model in {directory} to send it: {e}",
        ) from None


async def push(
    material: tls_store.Material,
    member: MemberView,
    directory: Path,
    *,
    timeout: float,  # noqa: ASYNC109  # EXOD_PEER_TIMEOUT, per address and for a stall
    manifest: Manifest | None = None,
    progress: Progress | None = None,
) -> Pushed:
    """Send `directory` to `member` unless it holds the same content; ExoError saying why not
    (its refusal as it gave it: weights_corrupt, disk_full, permission_denied; or
    peer_unreachable)."""
    if manifest is None:
        manifest = await read_manifest(directory)
    key, total = manifest.key, manifest.total
    if not member.addresses or member.port <= 0:
        raise ExoError(
            "peer_unreachable",
            f"this node knows no address of node {member.id}, so it cannot send it a model: "
            "start exod there and let it reach this node, then retry",
        )
    targets = [endpoint(a, member.port) for a in member.addresses]
    for target in targets:
        async with peer_channel(material, member.id, target) as channel:
            stub = peer_pb2_grpc.PeerStub(channel)
            try:
                held = await stub.HasModel(
                    peer_pb2.HasModelRequest(protocol_version=PROTOCOL_VERSION, key=key),
                    timeout=timeout,
                )
            except grpc.aio.AioRpcError as e:
                if e.code() in _GONE:
                    continue
                raise refusal(e, member.id) from None
            if held.have:
                if progress is not None:
                    progress(total, total)
                return Pushed(key, total, 0, had=True)
            sent = _Sent(total, progress)
            reply = await _stream(
                stub, directory, manifest, sent, member=member.id, timeout=timeout
            )
            return Pushed(key, total, sent.bytes, had=reply.had)
    raise ExoError(
        "peer_unreachable",
        f"node {member.id} did not answer at {', '.join(targets)} within {timeout:g}s "
        "(EXOD_PEER_TIMEOUT), so the model was not sent: start exod there (or check this "
        "machine can reach it), then retry",
    )


async def _stream(
    stub: peer_pb2_grpc.PeerAsyncStub,
    directory: Path,
    manifest: Manifest,
    sent: _Sent,
    *,
    member: str,
    timeout: float,  # noqa: ASYNC109  # EXOD_PEER_TIMEOUT: the stall is a few of them
) -> peer_pb2.PushModelReply:
    call = stub.PushModel(None)  # written to by exchange
    done = asyncio.ensure_future(exchange(call, chunks(directory, manifest, sent.add)))
    stall = STALL_PEER_TIMEOUTS * timeout
    try:
        while not done.done():
            await asyncio.wait({done}, timeout=min(1.0, stall))
            if not done.done() and time.monotonic() - sent.moved > stall:
                raise ExoError(
                    "peer_unreachable",
                    f"node {member} took no bytes of the model for {stall:g}s "
                    f"({STALL_PEER_TIMEOUTS} times EXOD_PEER_TIMEOUT), at {sent.bytes} of "
                    f"{sent.total}: the push was ended; check that node, then retry",
                )
    finally:
        if not done.done():
            done.cancel()
            await asyncio.wait({done})
    try:
        return done.result()
    except OSError as e:
        raise ExoError("model_unreadable", f"cannot read {directory} to send it: {e}") from None
    except grpc.aio.AioRpcError as e:
        if e.code() in _GONE:
            raise ExoError(
                "peer_unreachable",
                f"node {member} went away while it received the model ({sent.bytes} of "
                f"{sent.total} bytes sent); it kept nothing: retry once it is back",
            ) from None
        raise refusal(e, member) from None


PushCall = grpc.aio.StreamStreamCall[peer_pb2.ModelChunk, peer_pb2.PushModelReply]


async def exchange(
    call: PushCall, messages: AsyncIterator[peer_pb2.ModelChunk]
) -> peer_pb2.PushModelReply:
    """The sender's side of one PushModel call, `messages` being the manifest and then the
    bytes: the member's last reply. AioRpcError is the member's refusal as it gave it; an error
    of `messages` (the sender's own) ends the call and is raised.

    It writes only when the member has said to (peer.proto, PushModelReply): gRPC's asyncio
    client reports a write that meets the call's end as INTERNAL, in place of the status the
    member ended it with (grpc/grpc#36066), so the member never ends a call under a write."""
    try:
        await _answer(call)  # the call is taken: the caller's certificate passed
        first = await anext(messages, None)
        if first is not None:
            await call.write(first)
            answer = await _answer(call)
            if not answer.ready:  # held already: nothing more is read
                await call.done_writing()
                return answer
        stop = asyncio.Event()
        sending = asyncio.ensure_future(_send(call, messages, stop))
        reading = asyncio.ensure_future(_answer(call))
        try:
            await asyncio.wait({sending, reading}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                _raise_own(sending)
            answer = await reading
            if answer.stop:  # the member refuses: it reads on until this side half-closes
                stop.set()
                await asyncio.wait({sending})
                _raise_own(sending)
                answer = await _answer(call)  # its reason, now that no write is going
            return answer
        finally:
            for task in (sending, reading):
                task.cancel()
    except BaseException:
        call.cancel()  # on the sender's own error; nothing once the member has ended the call
        raise


async def _send(
    call: PushCall, messages: AsyncIterator[peer_pb2.ModelChunk], stop: asyncio.Event
) -> None:
    async for message in messages:
        if stop.is_set():
            break
        await call.write(message)
    await call.done_writing()


def _raise_own(sending: asyncio.Future[None]) -> None:
    """The error `sending` (done) ended with, when it is the sender's own: a write that met the
    call's end is not, as the member's answer says why the call ended."""
    error = sending.exception()
    if error is not None and not isinstance(
        error, (grpc.aio.AioRpcError, asyncio.InvalidStateError)
    ):
        raise error


async def _answer(call: PushCall) -> peer_pb2.PushModelReply:
    reply = await call.read()
    if not isinstance(reply, peer_pb2.PushModelReply):  # grpc.aio.EOF
        raise ExoError("internal", "the member ended the push without an answer")
    return reply


def refusal(e: grpc.aio.AioRpcError, member: str) -> ExoError:
    """A member's answer as an ExoError: its reason and message as it gave them."""
    return from_peer(
        e,
        f"node {member} failed to receive the model",
        unimplemented=f"node {member} runs an earlier exod that cannot receive a model's "
        "weights: upgrade exod there",
    )


async def push_layers(
    material: tls_store.Material,
    member: MemberView,
    model: Path,
    layers: range,
    *,
    scratch: Path,
    timeout: float,  # noqa: ASYNC109  # as in push
    progress: Progress | None = None,
) -> Pushed:
    """Send `member` the part of the full model in `model` that runs `layers`, written out
    under `scratch` first (a directory on this node's disk) and deleted after."""
    work = await asyncio.to_thread(_workdir, scratch)
    try:
        part = work / "part"
        try:
            await asyncio.to_thread(write_partial, model, part, layers)
        except OSError as e:
            raise ExoError(
                "model_unreadable",
                f"cannot write layers {layers.start}-{layers.stop - 1} of {model} under "
                f"{scratch} to send them: {e.strerror or e}",
            ) from None
        return await push(material, member, part, timeout=timeout, progress=progress)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


def _workdir(scratch: Path) -> Path:
    scratch.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".push-", dir=scratch))
