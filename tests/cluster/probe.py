"""A discovery probe for tests: announce one node with exod's discovery adapter, browse, and
print what it sees as JSON lines, until --seconds pass or SIGTERM; then say goodbye and exit 0.

    python -m tests.cluster.probe --interfaces ADDR --cluster C --node N --port P --seconds S

Lines: {"event": "ready"} once announced; {"event": "seen" | "gone", "verdict": ..., and the
candidate's fields} for each node; {"event": "stopped"} after the goodbye. With --rogue it
announces, with zeroconf directly, services whose TXT records are not exod's (see ROGUE), to
show that such records never break a real node.

It lives under tests/, not in exod: it announces a made-up node, which only a test wants, and
exod gains no entry point that nobody runs. Tests start it inside a network namespace they
made, with its interfaces pinned to that namespace's addresses (`--interfaces all` only where a
test shows what pinning changes); it refuses to run in the machine's own network namespace, so
it cannot multicast on the machine's real interfaces by accident.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from exod.cluster.candidates import Candidate, Me, classify
from exod.cluster.discovery import SERVICE_TYPE, Discovery, DiscoveryError
from exod.cluster.protocol import PROTOCOL_VERSION

# What a confused or hostile device might announce under exod's service type: each one wrong
# in another way. None of them may raise out of the adapter, and none may be reported.
ROGUE: dict[str, dict[bytes, bytes | None]] = {
    "rogue-proto": {b"cluster": b"c-a", b"node": b"n-rogue1", b"proto": b"one", b"port": b"1"},
    "rogue-port": {b"cluster": b"c-a", b"node": b"n-rogue2", b"proto": b"1.0", b"port": b"99999"},
    "rogue-nocluster": {b"node": b"n-rogue3", b"proto": b"1.0", b"port": b"52416"},
    "rogue-binary": {b"cluster": b"c-a", b"node": b"\xff\xfe\x00", b"proto": b"1.0", b"port": b"1"},
    "rogue-bare": {b"cluster": None, b"node": None, b"proto": None, b"port": None},
    "rogue-spaces": {b"cluster": b"c a", b"node": b"n rogue", b"proto": b"1.0", b"port": b"5"},
}


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def rogue(addresses: list[str], port: int, until: asyncio.Event) -> None:
    async with AsyncZeroconf(interfaces=addresses) as zc:
        infos = [
            AsyncServiceInfo(
                SERVICE_TYPE,
                f"{name}.{SERVICE_TYPE}",
                port=port,
                properties=properties,
                server=f"{name}.local.",
                parsed_addresses=addresses,
            )
            for name, properties in ROGUE.items()
        ]
        # At once: each registration probes its name for about a second.
        await asyncio.gather(*(zc.async_register_service(info) for info in infos))
        emit("ready")
        await until.wait()
    emit("stopped")


async def probe(args: argparse.Namespace, until: asyncio.Event) -> None:
    me = Me(node_id=args.node, cluster_id=args.cluster, proto=args.proto)

    def report(event: str) -> Callable[[Candidate], None]:
        def on(candidate: Candidate) -> None:
            fields = dataclasses.asdict(candidate)
            emit(event, verdict=classify(candidate, me).value, **fields)

        return on

    discovery = Discovery(
        me, args.port, interfaces=args.interfaces, on_seen=report("seen"), on_gone=report("gone")
    )
    try:
        await discovery.start()
    except DiscoveryError as e:
        sys.exit(f"probe: {e}")  # one line and exit 1, no traceback
    emit("ready")
    try:
        await until.wait()
    finally:
        await discovery.stop()
    emit("stopped")


async def main(args: argparse.Namespace) -> None:
    until = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, until.set)
    loop.call_later(args.seconds, until.set)
    if args.rogue:
        assert args.interfaces, "--rogue announces on the pinned addresses only"
        await rogue(args.interfaces, args.port, until)
    else:
        await probe(args, until)


def interfaces(text: str) -> list[str] | None:
    return None if text == "all" else text.split(",")


def in_own_netns() -> bool:
    """Whether this process runs in a named network namespace (one that `ip netns add` made,
    as the tests do), not in the machine's own."""
    try:
        here = os.stat("/proc/self/ns/net")
        named = [os.stat(f"/run/netns/{name}") for name in os.listdir("/run/netns")]
    except OSError:
        return False
    return any((ns.st_dev, ns.st_ino) == (here.st_dev, here.st_ino) for ns in named)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.probe")
    parser.add_argument("--interfaces", type=interfaces, required=True, help="ADDR,... or all")
    parser.add_argument("--cluster", default="c-a")
    parser.add_argument("--node", default="n-probe")
    parser.add_argument("--proto", default=PROTOCOL_VERSION)
    parser.add_argument("--port", type=int, default=52416)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rogue", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if not in_own_netns():
        sys.exit("probe: refusing to run outside a test's network namespace (ip netns exec NS ...)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    asyncio.run(main(parse_args(sys.argv[1:])))
