"""Admission, as pure functions: whether a new runner may start, and when a generation may.

A runner is decided before anything is spawned, from the model's files alone: a model that can
never fit is refused for good (65), one that does not fit now waits for nobody and is refused for
now (75) unless evicting idle runners, least recently used first, frees enough.

A generation reserves the KV cache it may grow to, (prompt + max_tokens) x the model's KV bytes
per token, and starts on its runner only while it fits beside the others under the runner's cap
(EXOD_MAX_RUNNER_MEMORY); until then it waits in the runner's queue. One that could not fit even
alone is refused for good (65).
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


# The supervisor sees no tokenizer, so a prompt's tokens are bounded from its UTF-8 bytes: a
# byte-level BPE token (every model mlx-lm loads) stands for at least one byte, so never more
# tokens than bytes. A chat template adds role markers around each message and may add a default
# system prompt (Qwen2's, a Llama 3 date line); these allowances cover the common ones.
TEMPLATE_TOKENS = 128
TEMPLATE_TOKENS_PER_MESSAGE = 16


def prompt_tokens_bound(text_bytes: int, messages: int, limit: int) -> int:
    """At most how many tokens a prompt takes: its bytes, plus the chat template's share.

    `limit` is the longest prompt the runner accepts (it refuses a longer one before any KV is
    made); 0: no limit.
    """
    bound = text_bytes + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * messages
    return min(bound, limit) if limit > 0 else bound


def reservation(prompt_tokens: int, max_tokens: int, kv_bytes_per_token: int) -> int:
    """The KV cache a generation may grow to: every prompt and generated token, all layers.

    It covers the copy of a cached prompt that the generation takes too (at most its prompt).
    """
    return (max(prompt_tokens, 0) + max(max_tokens, 0)) * max(kv_bytes_per_token, 0)


@dataclass(frozen=True)
class Occupancy:
    """One runner, as admission of its next generation sees it."""

    cap: int  # EXOD_MAX_RUNNER_MEMORY
    model: int  # the runner with nothing to do: measured while idle, else estimated, else 0
    measured: int | None  # its memory now (USS), None until sampled
    reserved: int  # the reservations of the generations it runs
    active: int  # how many it runs
    parallel: int  # EXOD_PARALLEL


def check_alone(need: int, model: int, cap: int) -> None:
    """Refuse (65) a generation whose reservation does not fit beside the model even alone."""
    if model + need > cap:
        raise ExoError(
            "model_too_large",
            f"this run may need {_size(need)} of KV cache (prompt + max_tokens) beside the "
            f"model's {_size(model)}, more than the runner memory cap of {_size(cap)} "
            "(EXOD_MAX_RUNNER_MEMORY): lower max_tokens, shorten the prompt, or raise the cap",
        )


def may_start(o: Occupancy, need: int) -> bool:
    """Whether a generation reserving `need` bytes may start on the runner now.

    Alone it always may (check_alone has passed): nothing it could wait for would free memory.
    Beside others, the runner's measured memory (which holds their KV so far, the prompt cache
    and MLX's buffer cache) plus every reservation, its own included, must fit under the cap:
    counting the KV twice that way errs on the side of the cap.
    """
    if o.active >= o.parallel:
        return False
    if o.active == 0:
        return True
    now = o.model if o.measured is None else o.measured
    return o.reserved + now + need <= o.cap


def _size(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n < 1 << 30 else _gib(n)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
