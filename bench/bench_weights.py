"""Weights to a member: the rate of a push over loopback mutual TLS against a plain file copy of
the same bytes, in the same run.

A real exod on 127.0.0.2 makes a cluster (`exoctl cluster init`); this process, with a
certificate of that cluster's CA as a member holds one, pushes a directory of random bytes
(4 files, `--mib` MiB in all) to its peer port with exod's own sender
(exod/cluster/weights_push.py): HasModel, then the manifest and 1 MiB chunks, which exod writes
and hashes as they come, fsyncs, and renames into its model cache. The baseline is
`shutil.copyfile` of the same files to another directory on the same disk, then an fsync of
each (what the receiver does too), so the ratio is what mTLS, gRPC, Python and the receiver's
SHA-256 cost over the disk. Reading the sender's manifest (one SHA-256 pass over the source)
is timed apart: a sender does it once per rank's part, however many members it sends it to.

The source files were just written, so both read them from the page cache. Each run pushes
anew: the member's entry is deleted between runs.

Run: `.venv/bin/python bench/bench_weights.py [--mib N] [--runs N]`. Nothing is asserted;
record the figures in docs/benchmarks.md. The exod started here is ended by its pid, also on
failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ beside exod/
from bench.node import BenchNode  # after the path above
from exod.cluster import pki, tls_store, weights_push
from exod.eventlog.fold import MemberView

ADDRESS = "127.0.0.2"
SENDER = "n-bench0000000"
FILES = 4


class Member(BenchNode):
    def __init__(self, work: Path) -> None:
        super().__init__(work, "member", ADDRESS)

    def member_view(self) -> MemberView:
        node_id = json.loads(self.exoctl("status", "--json"))["node_id"]
        return MemberView(node_id, "member", (ADDRESS,), self.port, "")

    def sender(self) -> tls_store.Material:
        """A member's certificate, signed with this node's CA key as a join would have it."""
        tls = tls_store.load(self.home / "tls")
        assert tls is not None and tls.ca_key is not None
        key = pki.new_node_key()
        csr = pki.csr_for(key, SENDER)
        cert = pki.sign_node(
            tls.ca_key, tls.ca_cert, csr, SENDER, lifetime_s=86400, now=time.time()
        )
        return tls_store.Material(ca_cert=tls.ca_cert, node_key=key, node_cert=cert)


def write_source(path: Path, total: int) -> None:
    path.mkdir()
    each = total // FILES
    for i in range(FILES):
        with (path / f"model-{i:05d}.safetensors").open("wb") as f:
            left = each
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n


def plain_copy(src: Path, dest: Path) -> float:
    started = time.perf_counter()
    dest.mkdir()
    for file in sorted(src.iterdir()):
        shutil.copyfile(file, dest / file.name)
        fd = os.open(dest / file.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB to send")
    parser.add_argument("--runs", type=int, default=3, help="pushes (and copies) to time")
    args = parser.parse_args()
    total = args.mib << 20
    work = Path(tempfile.mkdtemp(prefix="exo-bench-weights-"))
    member = Member(work)
    try:
        member.start()
        member.exoctl("cluster", "init")
        view, sender = member.member_view(), member.sender()
        source = work / "source"
        write_source(source, total)
        started = time.perf_counter()
        manifest = asyncio.run(weights_push.read_manifest(source))
        hashed = time.perf_counter() - started
        print(
            f"{args.mib} MiB in {FILES} files; sender's manifest (SHA-256 of all): "
            f"{hashed:.2f} s, {args.mib / hashed:.0f} MiB/s"
        )
        print("run | plain copy + fsync | push over mTLS | push / copy")
        for run in range(1, args.runs + 1):
            copied = plain_copy(source, work / f"copy-{run}")
            shutil.rmtree(work / f"copy-{run}")
            started = time.perf_counter()
            pushed = asyncio.run(
                weights_push.push(sender, view, source, timeout=10.0, manifest=manifest)
            )
            pushing = time.perf_counter() - started
            assert not pushed.had and pushed.sent == total
            shutil.rmtree(member.home / "cache" / "models" / pushed.key)
            print(
                f"{run} | {copied:.2f} s, {args.mib / copied:.0f} MiB/s | {pushing:.2f} s, "
                f"{args.mib / pushing:.0f} MiB/s | {copied / pushing:.2f}"
            )
    finally:
        member.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
