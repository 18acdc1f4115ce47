"""The runner: one model, loaded with mlx-lm, in a subprocess of its own.

    python -m exod.runners.runner --fd N --parent PID

The daemon spawns it with one end of a socket pair as fd N, in a new process group. Messages are
framed by exod.runners.pipe: ToRunner in, FromRunner out. Threads:
  - main: the handshake, the load (exod.runners.load), then the batch loop
    (exod.runners.batch): every generation runs here, where MLX runs. One rank of a model
    split over several runners (Load.rank) loads its part (exod.runners.rank_load) and steps
    in lockstep with the other ranks (exod.runners.lockstep);
  - pipe-reader: reads every frame into the Inbox, and on end of stream (the daemon is gone)
    kills the runner's whole process group (exod.runners.channel);
  - heartbeat: a Heartbeat every second, so that the daemon can tell a busy runner from a hung
    one, with the batch's counters.

Nothing imports MLX until the daemon asked for a load and "started" has been reported.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import logging
import os
import signal
import socket
import sys
import threading

from exod import RUNNER_PROTOCOL_VERSION
from exod.errors import REASONS, Exit, ExoError
from exod.proto.exo.v1 import runner_pb2
from exod.runners.channel import Channel, Inbox, Stats, heartbeat
from exod.runners.load import load
from exod.runners.rank_load import load_rank
from exod.runners.ring import Ring

log = logging.getLogger("exod.runner")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def arm_parent_death() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (the lifeline's second line).

    The signal follows the parent *thread* that spawned this process: the daemon must spawn
    runners from a thread that lives as long as it does (its event loop's).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


def hello_reply() -> runner_pb2.HelloReply:
    # Versions from the package metadata: importing MLX just to print them costs seconds.
    return runner_pb2.HelloReply(
        protocol_version=RUNNER_PROTOCOL_VERSION,
        pid=os.getpid(),  # this process runs MLX; the group's leader is the shim
        mlx_version=_version("mlx"),
        mlx_lm_version=_version("mlx-lm"),
    )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def serve(channel: Channel, inbox: Inbox) -> int:
    """The runner's life after the pipe is up: handshake, load, requests. Returns the exit code."""
    first = inbox.next()
    if first.WhichOneof("msg") != "hello":
        channel.error("internal", "the daemon did not start with Hello: restart exod")
        return Exit.INTERNAL
    if first.hello.protocol_version != RUNNER_PROTOCOL_VERSION:
        channel.error(
            "internal",
            f"runner protocol {RUNNER_PROTOCOL_VERSION} cannot serve a daemon speaking "
            f"{first.hello.protocol_version}: reinstall exod so that both come from one version",
        )
        return Exit.INTERNAL
    channel.send(runner_pb2.FromRunner(hello=hello_reply()))
    stats = Stats()
    threading.Thread(target=heartbeat, args=(channel, stats), name="heartbeat", daemon=True).start()

    msg = inbox.next()
    if msg.WhichOneof("msg") == "shutdown":
        return Exit.OK
    if msg.WhichOneof("msg") != "load":
        channel.error("internal", f"expected Load, got {msg.WhichOneof('msg')}: restart exod")
        return Exit.INTERNAL
    return run_model(msg.load, channel, inbox, stats)


def run_model(load_msg: runner_pb2.Load, channel: Channel, inbox: Inbox, stats: Stats) -> int:
    """Load the model (or this rank's part of it), say Ready, then serve until told to stop."""
    ring: Ring | None = None
    try:
        if load_msg.HasField("rank"):
            loaded, ring = load_rank(load_msg, channel)
        else:
            loaded = load(load_msg.model_path, channel)
    except ExoError as e:
        log.exception("load of %s failed (%s)", load_msg.model_path, e.reason)
        channel.error(e.reason, e.message)
        return REASONS[e.reason].exit
    if load_msg.mlx_cache_limit > 0:
        import mlx.core as mx

        # BatchGenerator empties MLX's buffer cache only every few hundred steps; unbounded, the
        # cache alone could take the runner past its memory cap.
        mx.set_cache_limit(load_msg.mlx_cache_limit)
    ready = runner_pb2.Ready(
        context_length=loaded.context_length,
        has_chat_template=bool(loaded.tokenizer.has_chat_template),
        load_s=loaded.load_s,
        kv_bytes_per_token=loaded.kv_bytes_per_token,
    )
    channel.send(runner_pb2.FromRunner(ready=ready))
    log.info("loaded %s in %.2f s", load_msg.model_path, loaded.load_s)

    from exod.runners.batch import BatchLoop
    from exod.runners.lockstep import RankLoop

    if ring is None:
        return BatchLoop(loaded, load_msg, channel, inbox, stats).run()
    return RankLoop(loaded, load_msg, channel, inbox, stats, ring=ring).run()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m exod.runners.runner")
    parser.add_argument("--fd", type=int, required=True, help="this end of the runner pipe")
    parser.add_argument("--parent", type=int, default=0, help="the daemon's pid")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arm_parent_death()
    # The daemon may have died before the death signal was armed; then nobody would kill us.
    if args.parent and os.getppid() != args.parent:
        return Exit.UNAVAILABLE
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s runner[%(process)d] %(levelname)s %(message)s",
    )
    # The runner reads local files only; mlx-lm and transformers must never reach the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    sock = socket.socket(fileno=args.fd)
    inbox = Inbox(sock)
    threading.Thread(target=inbox.read_forever, name="pipe-reader", daemon=True).start()
    return serve(Channel(sock), inbox)


if __name__ == "__main__":
    sys.exit(main())
