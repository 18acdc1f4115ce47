"""Which limit a runner has broken, if any: a pure verdict over what the supervisor observed.

The supervisor samples each runner a few times a second and ends it when `verdict` names a
reason. Progress, not liveness, is what counts: a load is alive while phases, layers and prefill
chunks keep arriving, and a batch of generations while any of them makes progress (a prefill
chunk, a token, an end); heartbeats alone prove nothing, since a runner wedged in C++ can still
run a heartbeat thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from exod.config import Settings


@dataclass(frozen=True)
class Limits:
    load_stall: float
    load_timeout: float
    decode_stall: float
    memory_cap: int

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(
            s.load_stall_timeout, s.load_timeout, s.decode_stall_timeout, s.max_runner_memory
        )


@dataclass(frozen=True)
class Watch:
    """One runner at one instant (monotonic seconds)."""

    state: str  # loading, ready, running (some generation is active), stopping
    now: float
    spawned_at: float
    last_progress: float  # the last load progress, or any request's prefill chunk, token or end
    # Some active generation has produced a token. While none has, every request is in prefill,
    # which reports per chunk like a load and so answers to the load stall limit.
    decoding: bool
    memory: int | None  # bytes of the runner's tree (USS), when measured


def verdict(limits: Limits, w: Watch) -> tuple[str, str] | None:
    """(reason, detail) for a runner to end now, or None."""
    if w.state == "stopping":
        return None
    if w.memory is not None and limits.memory_cap and w.memory > limits.memory_cap:
        return (
            "memory_limit",
            f"the runner's processes used {_size(w.memory)}, over the cap of "
            f"{_size(limits.memory_cap)} (EXOD_MAX_RUNNER_MEMORY)",
        )
    if w.state == "loading":
        return _loading(limits, w)
    if w.state == "running":
        return _running(limits, w)
    return None


def _loading(limits: Limits, w: Watch) -> tuple[str, str] | None:
    quiet = w.now - w.last_progress
    if w.now - w.spawned_at > limits.load_timeout:
        return (
            "load_timeout",
            f"the load took more than {limits.load_timeout:g}s in all (EXOD_LOAD_TIMEOUT)",
        )
    if quiet > limits.load_stall:
        return (
            "load_stall",
            f"the load made no progress for {quiet:.1f}s "
            f"(EXOD_LOAD_STALL_TIMEOUT={limits.load_stall:g})",
        )
    return None


def _running(limits: Limits, w: Watch) -> tuple[str, str] | None:
    # Prefill reports progress per chunk, like a load, so it answers to the load stall limit;
    # once tokens flow, the decode stall limit applies.
    quiet = w.now - w.last_progress
    if not w.decoding and quiet > limits.load_stall:
        return (
            "decode_stall",
            f"prefill made no progress for {quiet:.1f}s "
            f"(EXOD_LOAD_STALL_TIMEOUT={limits.load_stall:g})",
        )
    if w.decoding and quiet > limits.decode_stall:
        return (
            "decode_stall",
            f"no token for {quiet:.1f}s (EXOD_DECODE_STALL_TIMEOUT={limits.decode_stall:g})",
        )
    return None


def _size(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"
