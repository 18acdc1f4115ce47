"""The peer call Rank (bidirectional streaming) passes the peer server's certificate check like
every other call: a caller without a certificate of this cluster, or a removed member, is refused
with permission_denied before its first message is read; a member reaches the handler."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from exod.cluster import peer_server, pki
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.eventlog import EventStore, replay
from exod.journal import Journal
from exod.proto.exo.v1 import peer_pb2, peer_pb2_grpc
from tests.httpapi import free_port
from tests.integration.test_weights_push import (
    MEMBER,
    MEMBER_ADDRESS,
    SENDER,
    Ca,
    _mtls,
    _no_join,
    _refusal,
)

YEAR = 365 * 86400


async def _ups() -> AsyncIterator[peer_pb2.RankUp]:
    yield peer_pb2.RankUp(
        protocol_version=PROTOCOL_VERSION,
        start=peer_pb2.RankStart(instance_id="i-00000000", rank=1, size=2),
    )


def _results(tmp: Path, ca: Ca) -> list[tuple[grpc.StatusCode, str, str]]:
    async def run() -> list[tuple[grpc.StatusCode, str, str]]:
        store = EventStore(tmp / "exod.db", MEMBER)
        journal = Journal(store, replay(store), snapshot_every=500)
        peer_port, join_port = free_port(), free_port()
        own = ca.material(MEMBER)
        removed: set[str] = set()
        service = peer_server.PeerService(
            MEMBER,
            "member",
            _no_join,
            journal=journal,
            members=list,
            heartbeat_s=1.0,
            ca_cert=ca.cert,
        )
        server = await peer_server.start(
            bind=MEMBER_ADDRESS,
            peer_port=peer_port,
            join_port=join_port,
            ca_cert=ca.cert,
            node_key=own.node_key,
            node_cert=own.node_cert,
            service=service,
            is_removed=lambda node: node in removed,
        )
        targets = [
            (f"{MEMBER_ADDRESS}:{join_port}", grpc.ssl_channel_credentials(ca.cert)),
            (f"{MEMBER_ADDRESS}:{peer_port}", _mtls(ca.material(SENDER))),
            (f"{MEMBER_ADDRESS}:{peer_port}", _mtls(ca.material(SENDER))),
        ]
        results = []
        try:
            for i, (target, credentials) in enumerate(targets):
                if i == 2:
                    removed.add(SENDER)
                options = [("grpc.ssl_target_name_override", MEMBER)]
                async with grpc.aio.secure_channel(target, credentials, options=options) as ch:
                    call = peer_pb2_grpc.PeerStub(ch).Rank(_ups())
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await asyncio.wait_for(anext(aiter(call)), 10)
                    results.append((refused.value.code(), *_refusal(refused.value)))
        finally:
            await server.stop(grace=None)
            store.close()
        return results

    return asyncio.run(run())


def test_rank_is_checked_like_every_call(tmp_path: Path) -> None:
    ca = Ca(*pki.new_ca("c-111111111111", 10 * YEAR, time.time()))
    no_cert, member, removed = _results(tmp_path, ca)
    assert no_cert[:2] == (grpc.StatusCode.PERMISSION_DENIED, "permission_denied")
    assert "this call needs a certificate of this cluster" in no_cert[2]
    # A member passes the check; this node runs no ranks, and says so.
    assert member[1] == "internal" and "cannot run a rank" in member[2], member
    assert removed[:2] == (grpc.StatusCode.PERMISSION_DENIED, "permission_denied")
    assert f"node {SENDER} was removed from this cluster" in removed[2]
