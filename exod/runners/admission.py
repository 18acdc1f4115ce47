"""Whether a new runner may start, and which idle runners must make room: a pure plan.

Decided before anything is spawned, from the model's files alone: a model that can never fit is
refused for good (65), one that does not fit now waits for nobody and is refused for now (75)
unless evicting idle runners, least recently used first, frees enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from exod.errors import ExoError

# What a runner holds beyond its weights: Python, MLX, the tokenizer, buffers, the KV cache of a
# modest context. Measured on the demo models (about 60-100 MiB) and rounded up generously.
RUNTIME_OVERHEAD = 256 << 20
WEIGHT_FACTOR = 1.1


@dataclass(frozen=True)
class Idle:
    runner_id: str
    memory: int
    last_used: float


@dataclass(frozen=True)
class Memory:
    cap: int  # EXOD_MAX_RUNNER_MEMORY
    total: int  # the machine's RAM
    available: int  # available right now
    reserved: int  # EXOD_RESERVED_MEMORY


def estimate(weight_bytes: int) -> int:
    return int(weight_bytes * WEIGHT_FACTOR) + RUNTIME_OVERHEAD


def plan(need: int, memory: Memory, idle: Sequence[Idle]) -> list[str]:
    """The runner ids to evict before spawning a runner that needs `need` bytes; raises ExoError."""
    if need > memory.cap:
        raise ExoError(
            "model_too_large",
            f"this model needs about {_gib(need)}, more than the runner memory cap of "
            f"{_gib(memory.cap)} (EXOD_MAX_RUNNER_MEMORY): raise the cap or use a smaller "
            "or quantized model",
        )
    usable = memory.total - memory.reserved
    if need > usable:
        raise ExoError(
            "model_too_large",
            f"this model needs about {_gib(need)}; this machine has {_gib(memory.total)} of RAM "
            f"with {_gib(memory.reserved)} kept free (EXOD_RESERVED_MEMORY): use a smaller or "
            "quantized model",
        )
    free = memory.available - memory.reserved
    evict: list[str] = []
    for runner in sorted(idle, key=lambda r: r.last_used):
        if free >= need:
            break
        evict.append(runner.runner_id)
        free += runner.memory
    if free < need:
        raise ExoError(
            "memory_short",
            f"this model needs about {_gib(need)} but only {_gib(max(free, 0))} can be freed now "
            "(busy runners hold the rest): retry when a run ends, or `exoctl kill` a runner",
        )
    return evict


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
