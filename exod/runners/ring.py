"""The MLX ring between the ranks of a split model: joining it, and what the ranks say over it.

Each rank of a model split over several runners (Load.rank) joins MLX's ring backend: a TCP
connection to each neighbour, per MLX_HOSTFILE (one "ip:port" list per rank) and MLX_RANK. mlx-lm's
pipeline then sends the activations around it inside every forward pass. Besides those, the
ranks say three things to each other, all as plain integers or protobuf bytes (never pickle: the
ring is unauthenticated, and unpickling what arrives on it would run anyone's code):
  - share: before each batch step, what rank 0 took from the daemon (a RingStep);
  - from_leader: rank 0's value of a setting that must be the same on every rank;
  - agree_min: the least of every rank's value (how much of a prompt every rank has cached).

When a peer dies, MLX fails whatever is pending on the ring within about a second with a
RuntimeError that starts with "[ring]": is_ring_failure tells that apart from the rank's own
failures, and the rank ends with `rank_failed`.

Nothing here imports MLX at module level.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from exod.errors import ExoError
from exod.proto.exo.v1 import runner_pb2
from exod.runners import ring_watch
from exod.runners.channel import Channel
from exod.runners.load import one_line

RING_ERROR_PREFIX = "[ring]"


@dataclass(frozen=True)
class Shape:
    """A rank's place in the ring before the ring exists: what mlx-lm's pipeline reads of a group
    (rank() and size()), so that the layers are placed, and the weights checked and read, before
    this rank waits for the others."""

    index: int
    count: int

    def rank(self) -> int:
        return self.index

    def size(self) -> int:
        return self.count


def layer_range(split: Sequence[int], rank: int) -> range:
    """The layers a rank runs: mlx-lm's order, where rank 0 holds the last layers."""
    start = sum(split[rank + 1 :])
    return range(start, start + split[rank])


def check_rank(rank: runner_pb2.Rank, num_layers: int) -> None:
    """ExoError `internal` when the daemon's Rank cannot describe a ring over this model."""
    size = rank.size
    problem = ""
    if size < 2:
        problem = f"a ring of {size} ranks"
    elif not 0 <= rank.rank < size:
        problem = f"rank {rank.rank} of {size}"
    elif len(rank.split) != size or len(rank.hosts) != size:
        problem = f"{len(rank.split)} layer counts and {len(rank.hosts)} hosts for {size} ranks"
    elif any(n < 1 for n in rank.split):
        problem = f"split {list(rank.split)} leaves a rank without layers"
    elif sum(rank.split) != num_layers:
        problem = f"split {list(rank.split)} covers {sum(rank.split)} layers of {num_layers}"
    elif not all(_is_host(h) for h in rank.hosts):
        problem = f"hosts {list(rank.hosts)} are not all ip:port"
    if problem:
        raise ExoError(
            "internal",
            f"exod asked for an impossible rank ({problem}): restart exod, and report it if it "
            "persists",
        )


def _is_host(host: str) -> bool:
    address, _, port = host.rpartition(":")
    return bool(address) and port.isdigit() and 0 < int(port) < 65536


def hostfile(hosts: Sequence[str]) -> str:
    """MLX_HOSTFILE's content: for each rank, in rank order, the list of its addresses."""
    return json.dumps([[host] for host in hosts])


def is_ring_failure(exc: BaseException) -> bool:
    """Whether MLX raised this because the ring broke (a peer died or became unreachable)."""
    return isinstance(exc, RuntimeError) and str(exc).startswith(RING_ERROR_PREFIX)


def rank_failed(rank: runner_pb2.Rank, exc: BaseException) -> ExoError:
    return ExoError(
        "rank_failed",
        f"rank {rank.rank} of {rank.size} lost the ring to the model's other ranks "
        f"({one_line(exc)}): another rank stopped or its node became unreachable; run again to "
        "start every rank anew",
    )


def join(rank: runner_pb2.Rank, channel: Channel) -> Ring:
    """Join the ring: MLX's ring init, which returns once every rank has joined.

    It blocks, holding the GIL, for as long as a peer is missing: Rank.ring_timeout_s (a watcher
    process, exod.runners.ring_watch) or else the daemon's load-stall limit (this rank reported
    "ring" last) ends a ring that does not form. Once formed, a thread watches it break. The
    hostfile is private to this process, and gone once the ring is up.
    """
    import mlx.core as mx

    formed = None
    if rank.ring_timeout_s > 0:
        late = ExoError(
            "load_stall",
            f"rank {rank.rank} of {rank.size}: the ring did not form within "
            f"{rank.ring_timeout_s:g}s: another rank's runner did not start, or cannot reach "
            f"this one at {rank.hosts[rank.rank]}; run again",
        )
        formed = ring_watch.deadline(channel.fileno(), rank.ring_timeout_s, late)
    fd, name = tempfile.mkstemp(prefix="exod-ring-", suffix=".json")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(hostfile(rank.hosts))
        os.environ["MLX_RANK"] = str(rank.rank)
        os.environ["MLX_HOSTFILE"] = name
        group = mx.distributed.init(backend="ring", strict=True)
    except RuntimeError as e:
        raise ExoError(
            "rank_failed",
            f"rank {rank.rank} of {rank.size} cannot join the ring at {rank.hosts[rank.rank]} "
            f"({one_line(e)}): the port is taken or the address is not this machine's; run again",
        ) from e
    finally:
        os.unlink(name)
        if formed is not None:
            formed()
    end = ring_watch.Ending(channel)
    ring_watch.Watch(rank, end).start()
    return Ring(group, rank, end)


class Ring:
    """This rank's end of the ring, for what the ranks say besides the model's activations.

    Every call is a collective: every rank makes the same calls in the same order, or the ring
    mismatches them. They run on the CPU stream, after the caller has let the batch's pending
    step finish (mx.synchronize): a collective of the next forward pass still in flight on the
    generation stream could otherwise reach the ring before or after this one on different ranks.
    """

    def __init__(self, group: Any, rank: runner_pb2.Rank, end: ring_watch.Ending) -> None:
        self.group = group  # mx.distributed.Group
        self.rank = rank
        self.leader = rank.rank == 0
        self.end = end  # how this rank ends when the ring fails

    def share(self, step: runner_pb2.RingStep) -> runner_pb2.RingStep:
        """Rank 0's step on every rank (the others' `step` is ignored): its length, then its
        bytes, each an all_sum to which only rank 0 adds anything."""
        import mlx.core as mx
        import numpy as np

        data = step.SerializeToString() if self.leader else b""
        (size,) = self.from_leader([len(data)])
        if size == 0:
            return runner_pb2.RingStep()
        if self.leader:
            payload = mx.array(np.frombuffer(data, dtype=np.uint8))
        else:
            payload = mx.zeros((size,), dtype=mx.uint8)
        summed = mx.distributed.all_sum(payload, group=self.group, stream=mx.cpu)
        mx.eval(summed)
        return runner_pb2.RingStep.FromString(bytes(np.array(summed, copy=False)))

    def from_leader(self, values: Sequence[int]) -> list[int]:
        """Rank 0's values, on every rank."""
        import mlx.core as mx
        import numpy as np

        mine = list(values) if self.leader else [0] * len(values)
        summed = mx.distributed.all_sum(
            mx.array(mine, dtype=mx.int32), group=self.group, stream=mx.cpu
        )
        return [int(v) for v in np.asarray(summed)]

    def agree_min(self, values: Sequence[int]) -> list[int]:
        """The least of every rank's values, on every rank."""
        import mlx.core as mx
        import numpy as np

        least = mx.distributed.all_min(
            mx.array(list(values), dtype=mx.int32), group=self.group, stream=mx.cpu
        )
        return [int(v) for v in np.asarray(least)]
