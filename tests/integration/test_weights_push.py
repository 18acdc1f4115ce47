"""Pushing a rank's weights to a member: real peer servers (exod's own PeerService and
CertificateCheck, started by peer_server.start) on loopback addresses, real certificates of a
real cluster CA, real gRPC mutual TLS; the sender is exod's own (exod/cluster/weights_push.py),
or, where a test must send what exod never would, a test-side stream over the same stub.

What the member keeps is compared byte for byte with what was sent; every refusal leaves
nothing in its cache, hidden leftovers included.
"""

from __future__ import annotations

import asyncio
import filecmp
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import grpc
import pytest

from exod.cluster import peer_server, pki, tls_store, weights_push
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.errors import REASON_KEY, Exit, ExoError, exit_code
from exod.eventlog import EventStore, replay
from exod.eventlog.fold import MemberView
from exod.journal import Journal
from exod.models.cache import ModelCache
from exod.models.manifest import Manifest, ManifestFile, key_of, manifest_of
from exod.proto.exo.v1 import peer_pb2, peer_pb2_grpc
from exod.runners.partial import write_partial
from tests.httpapi import free_port

T = TypeVar("T")
YEAR = 365 * 86400
MIB = 1 << 20
MEMBER, SENDER = "n-aaaaaaaaaaaa", "n-bbbbbbbbbbbb"
MEMBER_ADDRESS = "127.0.0.2"  # the member listens here, apart from anything on 127.0.0.1


@dataclass(frozen=True)
class Ca:
    key: bytes
    cert: bytes

    def material(self, node_id: str) -> tls_store.Material:
        key = pki.new_node_key()
        cert = pki.sign_node(
            self.key,
            self.cert,
            pki.csr_for(key, node_id),
            node_id,
            lifetime_s=YEAR,
            now=time.time(),
        )
        return tls_store.Material(ca_cert=self.cert, node_key=key, node_cert=cert)


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca(*pki.new_ca("c-111111111111", 10 * YEAR, time.time()))


@dataclass
class Member:
    """A member's peer service, listening on MEMBER_ADDRESS, with its model cache."""

    cache: ModelCache
    peer_port: int
    join_port: int
    removed: set[str] = field(default_factory=set)

    @property
    def view(self) -> MemberView:
        return MemberView(MEMBER, "member", (MEMBER_ADDRESS,), self.peer_port, "")

    def kept(self) -> list[str]:
        """Everything in the cache's directory, hidden leftovers included."""
        root = self.cache.root
        return sorted(os.listdir(root)) if root.exists() else []


def _serving(tmp: Path, ca: Ca, bound: int, scenario: Callable[[Member], Awaitable[T]]) -> T:
    """Run `scenario` against a member serving with a cache bounded at `bound` bytes."""

    tmp.mkdir(parents=True, exist_ok=True)

    async def run() -> T:
        store = EventStore(tmp / "exod.db", MEMBER)
        journal = Journal(store, replay(store), snapshot_every=500)
        cache = ModelCache(tmp / "cache" / "models", bound, MEMBER)
        member = Member(cache, free_port(), free_port())
        own = ca.material(MEMBER)
        service = peer_server.PeerService(
            MEMBER,
            "member",
            _no_join,
            journal=journal,
            members=list,
            heartbeat_s=1.0,
            ca_cert=ca.cert,
            models=cache,
        )
        server = await peer_server.start(
            bind=MEMBER_ADDRESS,
            peer_port=member.peer_port,
            join_port=member.join_port,
            ca_cert=ca.cert,
            node_key=own.node_key,
            node_cert=own.node_cert,
            service=service,
            is_removed=lambda node: node in member.removed,
        )
        try:
            return await scenario(member)
        finally:
            await server.stop(grace=None)
            store.close()

    return asyncio.run(run())


async def _no_join(request: peer_pb2.JoinRequest) -> peer_pb2.JoinReply:
    raise AssertionError("not called")


def _random_dir(path: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A directory of files of these sizes (random bytes: nothing compresses them away)."""
    for name, size in sizes.items():
        file = path / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(hashlib.shake_256(f"{seed}{name}".encode()).digest(size) if size else b"")
    return path


def _same_tree(a: Path, b: Path) -> bool:
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    return names_a == names_b and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)


def _stub_call(
    target: str, credentials: grpc.ChannelCredentials, scenario: Callable[..., Awaitable[T]]
) -> Callable[[], Awaitable[T]]:
    async def call() -> T:
        options = [("grpc.ssl_target_name_override", MEMBER)]
        async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
            return await scenario(peer_pb2_grpc.PeerStub(channel))

    return call


def _mtls(material: tls_store.Material) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(material.ca_cert, material.node_key, material.node_cert)


async def _raw_push(
    member: Member, material: tls_store.Material, messages: AsyncIterator[peer_pb2.ModelChunk]
) -> peer_pb2.PushModelReply:
    """A test-side sender: these messages, as they are, to the member's PushModel."""
    target = f"{MEMBER_ADDRESS}:{member.peer_port}"

    async def push(stub: peer_pb2_grpc.PeerAsyncStub) -> peer_pb2.PushModelReply:
        return await weights_push.exchange(stub.PushModel(None), messages)

    return await _stub_call(target, _mtls(material), push)()


def _refusal(e: grpc.aio.AioRpcError) -> tuple[str, str]:
    # (key, value) pairs at run time, whatever grpc-stubs says of aio's Metadata.
    pairs = cast("list[tuple[str, str | bytes]]", list(e.trailing_metadata() or ()))
    reason = next((str(v) for k, v in pairs if k == REASON_KEY), "")
    return reason, e.details() or ""


def _entries(cache: ModelCache) -> Iterator[str]:
    return (e.key for e in cache.entries())


# --- a push lands, byte for byte; a second one streams nothing ---------------------------------


def test_a_ranks_part_lands_byte_for_byte_and_a_second_push_streams_nothing(
    tmp_path: Path, ca: Ca, qwen2: Path
) -> None:
    expected = write_partial(qwen2, tmp_path / "expected", range(1, 2))
    material = ca.material(SENDER)
    progress: list[tuple[int, int]] = []

    async def scenario(member: Member) -> tuple[weights_push.Pushed, weights_push.Pushed, int]:
        first = await weights_push.push_layers(
            material,
            member.view,
            qwen2,
            range(1, 2),
            scratch=tmp_path / "scratch",
            timeout=5.0,
            progress=lambda sent, total: progress.append((sent, total)),
        )
        calls = len(progress)
        again = await weights_push.push_layers(
            material,
            member.view,
            qwen2,
            range(1, 2),
            scratch=tmp_path / "scratch",
            timeout=5.0,
            progress=lambda sent, total: progress.append((sent, total)),
        )
        return first, again, calls

    first, again, calls = _serving(tmp_path / "member", ca, 1 << 30, scenario)
    manifest = manifest_of(expected)
    assert first.key == manifest.key and not first.had
    assert first.sent == first.total == manifest.total
    kept = tmp_path / "member" / "cache" / "models" / first.key
    assert _same_tree(kept, expected)
    assert progress[calls - 1] == (manifest.total, manifest.total)
    assert [s for s, _ in progress[:calls]] == sorted(s for s, _ in progress[:calls])
    # The member had it: asked, and nothing streamed.
    assert again.had and again.sent == 0 and again.key == first.key
    assert progress[calls:] == [(manifest.total, manifest.total)]
    # The sender's scratch copy is gone.
    assert os.listdir(tmp_path / "scratch") == []


def test_files_of_several_chunks_and_subdirectories_land_whole(tmp_path: Path, ca: Ca) -> None:
    source = _random_dir(
        tmp_path / "src",
        {"a.safetensors": 3 * MIB + 17, "sub/b.bin": MIB, "empty.txt": 0, "c.json": 5},
    )
    material = ca.material(SENDER)

    async def scenario(member: Member) -> weights_push.Pushed:
        return await weights_push.push(material, member.view, source, timeout=5.0)

    pushed = _serving(tmp_path / "member", ca, 1 << 30, scenario)
    assert pushed.sent == 4 * MIB + 22
    assert _same_tree(tmp_path / "member" / "cache" / "models" / pushed.key, source)


def test_a_key_held_already_is_answered_without_reading_its_chunks(tmp_path: Path, ca: Ca) -> None:
    source = _random_dir(tmp_path / "src", {"w.bin": 2 * MIB})
    manifest = manifest_of(source)
    material = ca.material(SENDER)

    async def scenario(member: Member) -> peer_pb2.PushModelReply:
        await weights_push.push(material, member.view, source, timeout=5.0)

        async def garbage() -> AsyncIterator[peer_pb2.ModelChunk]:
            async for message in weights_push.chunks(source, manifest):
                if message.HasField("data"):
                    message.data.data = b"\0" * len(message.data.data)
                yield message

        return await _raw_push(member, material, garbage())

    reply = _serving(tmp_path / "member", ca, 1 << 30, scenario)
    assert reply.had and reply.bytes_received == 0
    assert _same_tree(tmp_path / "member" / "cache" / "models" / manifest.key, source)


# --- what is refused leaves nothing behind -----------------------------------------------------


def _flipped(source: Path, manifest: Manifest, at: int) -> AsyncIterator[peer_pb2.ModelChunk]:
    """exod's own stream, one byte flipped in the data chunk number `at`."""

    async def messages() -> AsyncIterator[peer_pb2.ModelChunk]:
        n = 0
        async for message in weights_push.chunks(source, manifest):
            if message.HasField("data"):
                if n == at:
                    data = bytearray(message.data.data)
                    data[len(data) // 2] ^= 0x01
                    message.data.data = bytes(data)
                n += 1
            yield message

    return messages()


# a.bin is sent first: a flip in it is refused while 8 MiB of w.bin are still to come, so the
# sender must be told to stop; a flip in w.bin's last chunk is refused after it half-closed.
@pytest.mark.parametrize("at", [0, 9], ids=["midway", "last chunk"])
def test_a_flipped_byte_is_refused_as_corrupt_and_nothing_stays(
    tmp_path: Path, ca: Ca, at: int
) -> None:
    source = _random_dir(tmp_path / "src", {"a.bin": 5, "w.bin": 8 * MIB + 5})
    manifest = manifest_of(source)
    material = ca.material(SENDER)

    async def scenario(member: Member) -> tuple[str, str, list[str]]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _raw_push(member, material, _flipped(source, manifest, at))
        return (*_refusal(refused.value), member.kept())

    reason, message, kept = _serving(tmp_path / "member", ca, 1 << 30, scenario)
    assert reason == "weights_corrupt"
    assert exit_code(reason, None) == Exit.CANNOT_RUN
    assert message.startswith(f"node {MEMBER} refused model {manifest.key[:16]}… from node ")
    flipped = "a.bin" if at == 0 else "w.bin"
    assert f"'{flipped}' whose SHA-256 is" in message and "nothing of it was kept" in message
    assert kept == []


def _manifest_message(files: list[ManifestFile], key: str | None = None) -> peer_pb2.ModelChunk:
    return peer_pb2.ModelChunk(
        protocol_version=PROTOCOL_VERSION,
        manifest=peer_pb2.ModelManifest(
            key=key if key is not None else key_of(files),
            files=[peer_pb2.ModelFile(path=f.path, size=f.size, sha256=f.sha256) for f in files],
        ),
    )


def _data(path: str, offset: int, data: bytes) -> peer_pb2.ModelChunk:
    return peer_pb2.ModelChunk(data=peer_pb2.ModelData(path=path, offset=offset, data=data))


EVIL = b"#!/bin/sh\necho owned\n"
EVIL_FILE = ManifestFile("../evil.sh", len(EVIL), hashlib.sha256(EVIL).digest())
GOOD = ManifestFile("config.json", 2, hashlib.sha256(b"{}").digest())


@pytest.mark.parametrize(
    ("messages", "reason", "says"),
    [
        (
            [_manifest_message([GOOD, EVIL_FILE]), _data("config.json", 0, b"{}")],
            "weights_corrupt",
            "it names the path '../evil.sh', which has an empty, '.' or '..' part",
        ),
        (
            [_manifest_message([ManifestFile("/tmp/evil.sh", 1, bytes(32))])],
            "weights_corrupt",
            "the absolute path '/tmp/evil.sh'",
        ),
        (
            [_manifest_message([GOOD]), _data("config.json", 0, b"{}"), _data("x.sh", 0, EVIL)],
            "weights_corrupt",
            "it sent bytes of 'x.sh', which its manifest does not list",
        ),
        (
            [_manifest_message([GOOD]), _data("config.json", 0, b"{}  ")],
            "weights_corrupt",
            "it sent more than the 2 bytes of 'config.json'",
        ),
        (
            [_manifest_message([GOOD]), _data("config.json", 0, b"{")],
            "weights_corrupt",
            "only 1 of the 2 bytes of 'config.json' before the stream ended",
        ),
        (
            [_manifest_message([GOOD], key="ab" * 32), _data("config.json", 0, b"{}")],
            "weights_corrupt",
            "its key is not the SHA-256 of its list of files",
        ),
        (
            [_data("config.json", 0, b"{}")],
            "invalid_argument",
            "its first message was not the manifest",
        ),
        (
            [_manifest_message([GOOD]), _data("config.json", 0, b"{}" * (MIB // 2 + 1))],
            "invalid_argument",
            f"bytes in one chunk, more than {MIB}",
        ),
    ],
    ids=[
        "dot-dot path",
        "absolute path",
        "a file not in the manifest",
        "more bytes than its size",
        "stream ends short",
        "a key not its own",
        "no manifest first",
        "a chunk over 1 MiB",
    ],
)
def test_what_the_manifest_does_not_say_is_refused_and_nothing_stays(
    tmp_path: Path, ca: Ca, messages: list[peer_pb2.ModelChunk], reason: str, says: str
) -> None:
    material = ca.material(SENDER)

    async def stream() -> AsyncIterator[peer_pb2.ModelChunk]:
        for message in messages:
            yield message

    async def scenario(member: Member) -> tuple[str, str, list[str]]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _raw_push(member, material, stream())
        return (*_refusal(refused.value), member.kept())

    got, message, kept = _serving(tmp_path / "member", ca, 1 << 30, scenario)
    assert (got, says in message) == (reason, True), message
    assert "\n" not in message
    assert kept == []
    assert not (tmp_path / "member" / "cache" / "evil.sh").exists()
    assert not (tmp_path / "member" / "evil.sh").exists()


def test_a_sender_that_hangs_up_midway_leaves_nothing(tmp_path: Path, ca: Ca) -> None:
    source = _random_dir(tmp_path / "src", {"w.bin": 4 * MIB})
    manifest = manifest_of(source)
    material = ca.material(SENDER)

    async def scenario(member: Member) -> list[str]:
        target = f"{MEMBER_ADDRESS}:{member.peer_port}"
        half: asyncio.Event = asyncio.Event()

        async def messages() -> AsyncIterator[peer_pb2.ModelChunk]:
            n = 0
            async for message in weights_push.chunks(source, manifest):
                yield message
                n += 1
                if n == 3:  # the manifest and two chunks: then stop sending, never finish
                    half.set()
                    await asyncio.sleep(3600)

        options = [("grpc.ssl_target_name_override", MEMBER)]
        async with grpc.aio.secure_channel(target, _mtls(material), options=options) as channel:
            call = peer_pb2_grpc.PeerStub(channel).PushModel(messages())
            await half.wait()
            # The member is writing: its hidden directory is there until the call ends.
            for _ in range(100):
                if member.kept():
                    break
                await asyncio.sleep(0.02)
            assert member.kept() and member.kept()[0].startswith(".incoming-")
            call.cancel()
        for _ in range(100):
            if not member.kept():
                break
            await asyncio.sleep(0.02)
        return member.kept()

    assert _serving(tmp_path / "member", ca, 1 << 30, scenario) == []


# --- who may push ------------------------------------------------------------------------------


def test_a_caller_without_a_certificate_of_this_cluster_is_refused_before_a_byte_is_written(
    tmp_path: Path, ca: Ca
) -> None:
    source = _random_dir(tmp_path / "src", {"w.bin": MIB})
    manifest = manifest_of(source)
    stranger = Ca(*pki.new_ca("c-222222222222", 10 * YEAR, time.time())).material(SENDER)
    material = ca.material(SENDER)

    async def scenario(member: Member) -> list[tuple[grpc.StatusCode, str, str]]:
        async def push(stub: peer_pb2_grpc.PeerAsyncStub) -> peer_pb2.PushModelReply:
            return await weights_push.exchange(
                stub.PushModel(None), weights_push.chunks(source, manifest)
            )

        results = []
        calls = [
            # the join port: TLS without a client certificate, where only Join is served
            _stub_call(
                f"{MEMBER_ADDRESS}:{member.join_port}",
                grpc.ssl_channel_credentials(ca.cert),
                push,
            ),
            # a node removed from the cluster, with its still valid certificate
            _stub_call(f"{MEMBER_ADDRESS}:{member.peer_port}", _mtls(material), push),
        ]
        member.removed.add(SENDER)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(call(), 10)
            results.append((refused.value.code(), *_refusal(refused.value)))
        # a certificate of another cluster: the peer port's handshake fails
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(
                _stub_call(f"{MEMBER_ADDRESS}:{member.peer_port}", _mtls(stranger), push)(), 10
            )
        results.append((refused.value.code(), "", ""))
        assert member.kept() == []
        assert not member.cache.root.exists()  # not even made
        return results

    no_cert, removed, stranger_result = _serving(tmp_path / "member", ca, 1 << 30, scenario)
    assert no_cert[:2] == (grpc.StatusCode.PERMISSION_DENIED, "permission_denied"), no_cert
    assert "this call needs a certificate of this cluster" in no_cert[2]
    assert removed[:2] == (grpc.StatusCode.PERMISSION_DENIED, "permission_denied")
    assert f"node {SENDER} was removed from this cluster" in removed[2]
    assert stranger_result[0] == grpc.StatusCode.UNAVAILABLE


def test_exods_sender_reports_a_refusal_as_the_member_gave_it(tmp_path: Path, ca: Ca) -> None:
    source = _random_dir(tmp_path / "src", {"w.bin": MIB})
    material = ca.material(SENDER)

    async def scenario(member: Member) -> ExoError:
        member.removed.add(SENDER)
        with pytest.raises(ExoError) as refused:
            await weights_push.push(material, member.view, source, timeout=5.0)
        return refused.value

    e = _serving(tmp_path / "member", ca, 1 << 30, scenario)
    assert e.reason == "permission_denied" and f"node {SENDER} was removed" in e.message


def test_an_unreachable_member_is_named(tmp_path: Path, ca: Ca) -> None:
    source = _random_dir(tmp_path / "src", {"w.bin": 10})
    port = free_port()  # nobody listens there
    view = MemberView(MEMBER, "member", (MEMBER_ADDRESS,), port, "")

    async def scenario() -> ExoError:
        with pytest.raises(ExoError) as refused:
            await weights_push.push(ca.material(SENDER), view, source, timeout=1.0)
        return refused.value

    e = asyncio.run(scenario())
    assert e.reason == "peer_unreachable"
    assert exit_code(e.reason, None) == Exit.TEMPFAIL
    assert e.message.startswith(f"node {MEMBER} did not answer at {MEMBER_ADDRESS}:{port}")


# --- the cache's bound -------------------------------------------------------------------------


def test_the_least_recently_used_model_is_evicted_and_one_in_use_never(
    tmp_path: Path, ca: Ca
) -> None:
    dirs = [_random_dir(tmp_path / f"m{i}", {"w.bin": MIB}, seed=i) for i in range(4)]
    keys = [manifest_of(d).key for d in dirs]
    material = ca.material(SENDER)

    async def scenario(member: Member) -> list[list[str]]:
        seen = []

        async def push(i: int) -> None:
            await weights_push.push(material, member.view, dirs[i], timeout=5.0)
            seen.append(sorted(_entries(member.cache)))
            await asyncio.sleep(0.01)  # distinct times of use

        await push(0)
        await push(1)
        await push(0)  # held: asked, and so used: 1 is now the least recently used
        await push(2)  # room for two: 1 goes
        with member.cache.use(keys[0]):  # a rank runs on 0
            await asyncio.sleep(0.01)
            await push(2)  # used again: 0 is the least recently used now, but in use
            await push(3)  # so 2 goes
        return seen

    # Room for two of these directories, not three.
    seen = _serving(tmp_path / "member", ca, 2 * MIB + MIB // 2, scenario)
    assert seen == [
        sorted(keys[:1]),
        sorted(keys[:2]),
        sorted(keys[:2]),
        sorted([keys[0], keys[2]]),
        sorted([keys[0], keys[2]]),
        sorted([keys[0], keys[3]]),
    ]


def test_a_push_that_cannot_fit_is_refused_with_disk_full_and_nothing_is_evicted(
    tmp_path: Path, ca: Ca
) -> None:
    small = _random_dir(tmp_path / "small", {"w.bin": MIB})
    big = _random_dir(tmp_path / "big", {"w.bin": 3 * MIB})
    other = _random_dir(tmp_path / "other", {"w.bin": MIB + MIB // 2}, seed=1)
    material = ca.material(SENDER)

    async def scenario(member: Member) -> tuple[ExoError, ExoError, list[str]]:
        pushed = await weights_push.push(material, member.view, small, timeout=5.0)
        with pytest.raises(ExoError) as too_big:
            await weights_push.push(material, member.view, big, timeout=5.0)
        with member.cache.use(pushed.key), pytest.raises(ExoError) as in_use:
            await weights_push.push(material, member.view, other, timeout=5.0)
        return too_big.value, in_use.value, member.kept()

    too_big, in_use, kept = _serving(tmp_path / "member", ca, 2 * MIB, scenario)
    assert kept == [manifest_of(small).key]  # still there: nothing evicted for a refusal
    assert (too_big.reason, in_use.reason) == ("disk_full", "disk_full")
    assert exit_code("disk_full", None) == Exit.TEMPFAIL
    assert too_big.message == (
        f"node {MEMBER} keeps at most 2 MiB of models for its cluster (EXOD_MODEL_CACHE_BYTES), "
        "and this one needs 3 MiB: raise EXOD_MODEL_CACHE_BYTES there (a size, or a percentage "
        "of its disk)"
    )
    assert in_use.message == (
        f"node {MEMBER} cannot keep 2 MiB more of models for its cluster: it holds 1 MiB of its "
        "2 MiB (EXOD_MODEL_CACHE_BYTES), 1 MiB of it in use by models running there, which "
        "stay; raise EXOD_MODEL_CACHE_BYTES there, or stop a split model that runs there"
    )


def test_a_file_that_shrinks_after_it_was_hashed_is_the_senders_error(
    tmp_path: Path, ca: Ca
) -> None:
    source = _random_dir(tmp_path / "src", {"w.bin": 2 * MIB})
    manifest = manifest_of(source)
    (source / "w.bin").write_bytes(b"\0" * MIB)
    material = ca.material(SENDER)

    async def scenario(member: Member) -> tuple[ExoError, list[str]]:
        with pytest.raises(ExoError) as failed:
            await weights_push.push(material, member.view, source, timeout=5.0, manifest=manifest)
        # The member may still be starting its side when the sender gave up: wait until its
        # home has stayed empty a while (it ends its side when the call ends), at most 5 s.
        empty_for = 0
        for _ in range(250):
            empty_for = 0 if member.kept() else empty_for + 1
            if empty_for >= 15:
                break
            await asyncio.sleep(0.02)
        return failed.value, member.kept()

    e, kept = _serving(tmp_path / "member", ca, 1 << 30, scenario)
    assert e.reason == "model_unreadable"
    assert e.message.startswith(f"{source / 'w.bin'} ended at {MIB} of its {2 * MIB} bytes")
    assert kept == []
