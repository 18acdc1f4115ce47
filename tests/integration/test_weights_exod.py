"""A real exod receives a rank's weights: it made a cluster (`exoctl cluster init`), and the
test, holding a certificate of that cluster's CA as a member would, pushes to its peer port with
exod's own sender. What it keeps lands under its home; its EXOD_MODEL_CACHE_BYTES bounds it;
what an exod stopped mid-receive left is gone after its start; a member that stops taking
bytes mid-push (SIGSTOP) has the push ended, and keeps nothing once it runs again.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exod.cluster import pki, tls_store, weights_push
from exod.errors import Exit, ExoError, exit_code
from exod.eventlog.fold import MemberView
from exod.runners.partial import write_partial
from tests.daemon import Daemon, wait_until
from tests.httpapi import free_port

ADDRESS = "127.0.0.5"
SENDER = "n-cccccccccccc"


@pytest.fixture
def member(tmp_path: Path) -> Iterator[tuple[Daemon, MemberView, tls_store.Material]]:
    port = free_port()
    daemon = Daemon.create(
        tmp_path / "home",
        EXOD_PEER_BIND=ADDRESS,
        EXOD_PEER_PORT=str(port),
        EXOD_JOIN_PORT=str(free_port()),
        EXOD_MODEL_CACHE_BYTES="8M",
    )
    # What an exod that stopped mid-receive leaves: deleted at start.
    leftover = tmp_path / "home" / "cache" / "models" / ".incoming-0123-x"
    leftover.mkdir(parents=True)
    (leftover / "w.bin").write_bytes(b"half")
    try:
        daemon.start()
        daemon.ok("cluster", "init")
        node_id = str(daemon.status()["node_id"])
        tls = tls_store.load(tmp_path / "home" / "tls")
        assert tls is not None and tls.ca_key is not None
        # A member's certificate, signed by this cluster's CA as a join would have it signed.
        key = pki.new_node_key()
        cert = pki.sign_node(
            tls.ca_key,
            tls.ca_cert,
            pki.csr_for(key, SENDER),
            SENDER,
            lifetime_s=86400,
            now=time.time(),
        )
        sender = tls_store.Material(ca_cert=tls.ca_cert, node_key=key, node_cert=cert)
        yield daemon, MemberView(node_id, "home", (ADDRESS,), port, ""), sender
    finally:
        daemon.cleanup()


def test_a_real_exod_keeps_a_pushed_part_under_its_home_within_its_bound(
    tmp_path: Path, qwen2: Path, member: tuple[Daemon, MemberView, tls_store.Material]
) -> None:
    daemon, view, sender = member
    cache = daemon.home / "cache" / "models"
    assert not (cache / ".incoming-0123-x").exists()

    async def scenario() -> tuple[weights_push.Pushed, weights_push.Pushed, ExoError]:
        pushed = await weights_push.push_layers(
            sender, view, qwen2, range(0, 1), scratch=tmp_path / "scratch", timeout=5.0
        )
        again = await weights_push.push_layers(
            sender, view, qwen2, range(0, 1), scratch=tmp_path / "scratch", timeout=5.0
        )
        big = tmp_path / "big"
        big.mkdir()
        (big / "w.bin").write_bytes(b"\1" * (9 << 20))
        with pytest.raises(ExoError) as refused:
            await weights_push.push(sender, view, big, timeout=5.0)
        return pushed, again, refused.value

    pushed, again, refused = asyncio.run(scenario())
    expected = write_partial(qwen2, tmp_path / "expected", range(0, 1))
    kept = cache / pushed.key
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in kept.iterdir()) == names
    assert all(filecmp.cmp(expected / n, kept / n, shallow=False) for n in names)
    assert again.had and again.sent == 0
    assert refused.reason == "disk_full" and exit_code(refused.reason, None) == Exit.TEMPFAIL
    assert refused.message == (
        f"node {view.id} keeps at most 8 MiB of models for its cluster (EXOD_MODEL_CACHE_BYTES), "
        "and this one needs 9 MiB: raise EXOD_MODEL_CACHE_BYTES there (a size, or a percentage "
        "of its disk)"
    )
    assert sorted(p.name for p in cache.iterdir()) == [pushed.key]
    assert "received model" in daemon.log()


def test_a_member_that_stops_taking_bytes_has_the_push_ended_and_keeps_nothing(
    tmp_path: Path, member: tuple[Daemon, MemberView, tls_store.Material]
) -> None:
    daemon, view, sender = member
    source = tmp_path / "source"
    source.mkdir()
    (source / "w.bin").write_bytes(os.urandom(6 << 20))
    pid = daemon.pid
    timeout = 1.0

    def stop_it(sent: int, total: int) -> None:
        if sent == 1 << 20:  # the first chunk went: the member stops mid-receive
            os.kill(pid, signal.SIGSTOP)

    async def scenario() -> tuple[ExoError, float]:
        started = time.monotonic()
        with pytest.raises(ExoError) as ended:
            await weights_push.push(sender, view, source, timeout=timeout, progress=stop_it)
        return ended.value, time.monotonic() - started

    try:
        ended, took = asyncio.run(scenario())
    finally:
        os.kill(pid, signal.SIGCONT)
    stall = weights_push.STALL_PEER_TIMEOUTS * timeout
    assert ended.reason == "peer_unreachable" and exit_code(ended.reason, None) == Exit.TEMPFAIL
    assert ended.message.startswith(f"node {view.id} took no bytes of the model for {stall:g}s")
    assert took < stall + 2
    cache = daemon.home / "cache" / "models"
    assert wait_until(lambda: not cache.exists() or not os.listdir(cache), 10), os.listdir(cache)
