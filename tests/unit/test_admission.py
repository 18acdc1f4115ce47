"""admission.estimate and admission.plan: whether a new runner may start and who makes room.

Both are pure. plan is checked case by case at every boundary, then against a brute-force
statement of the rule over many small machines: refuse for good (65) what can never fit, evict
idle runners least recently used first and no more than needed, refuse for now (75) what does
not fit even then.
"""

from __future__ import annotations

import itertools
import random

import pytest

from exod.errors import REASONS, Exit, ExoError
from exod.runners.admission import (
    RUNTIME_OVERHEAD,
    WEIGHT_FACTOR,
    Idle,
    Memory,
    estimate,
    plan,
)

GIB = 1 << 30
MIB = 1 << 20


def machine(
    *, cap: int = 8 * GIB, total: int = 16 * GIB, available: int = 10 * GIB, reserved: int = GIB
) -> Memory:
    return Memory(cap=cap, total=total, available=available, reserved=reserved)


def refusal(need: int, memory: Memory, idle: list[Idle] | None = None) -> ExoError:
    with pytest.raises(ExoError) as raised:
        plan(need, memory, idle or [])
    return raised.value


# --- estimate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (0, RUNTIME_OVERHEAD),
        (1000, 1100 + RUNTIME_OVERHEAD),
        (GIB, int(GIB * 1.1) + RUNTIME_OVERHEAD),
        (400 * MIB, int(400 * MIB * 1.1) + 256 * MIB),
    ],
)
def test_estimate_is_weights_times_1_1_plus_256_mib(weights: int, expected: int) -> None:
    assert WEIGHT_FACTOR == 1.1
    assert RUNTIME_OVERHEAD == 256 * MIB
    assert estimate(weights) == expected


def test_estimate_grows_with_the_weights() -> None:
    sizes = [0, 1, 10, MIB, 100 * MIB, GIB, 70 * GIB]
    estimates = [estimate(s) for s in sizes]
    assert estimates == sorted(estimates)
    assert all(e >= s for s, e in zip(sizes, estimates, strict=True))


# --- plan: refusals -----------------------------------------------------------------------------


def test_a_model_over_the_cap_is_refused_for_good() -> None:
    err = refusal(8 * GIB + 1, machine(cap=8 * GIB))
    assert err.reason == "model_too_large"
    assert REASONS[err.reason].exit == Exit.CANNOT_RUN
    assert "EXOD_MAX_RUNNER_MEMORY" in err.message
    assert plan(8 * GIB, machine(cap=8 * GIB), []) == []  # the cap itself fits


def test_a_model_over_ram_minus_reserved_is_refused_for_good() -> None:
    memory = machine(cap=64 * GIB, total=16 * GIB, available=16 * GIB, reserved=2 * GIB)
    err = refusal(14 * GIB + 1, memory)
    assert err.reason == "model_too_large"
    assert REASONS[err.reason].exit == Exit.CANNOT_RUN
    assert "EXOD_RESERVED_MEMORY" in err.message
    assert plan(14 * GIB, memory, []) == []


def test_the_cap_is_checked_first_even_with_idle_runners_to_evict() -> None:
    idle = [Idle("r-a", 100 * GIB, 1.0)]
    assert refusal(9 * GIB, machine(cap=8 * GIB), idle).reason == "model_too_large"


def test_memory_short_now_is_a_temporary_refusal() -> None:
    err = refusal(2 * GIB, machine(available=2 * GIB, reserved=GIB))
    assert err.reason == "memory_short"
    assert REASONS[err.reason].exit == Exit.TEMPFAIL
    assert "retry" in err.message


def test_memory_short_even_after_evicting_every_idle_runner() -> None:
    idle = [Idle("r-a", GIB, 1.0), Idle("r-b", GIB, 2.0)]
    err = refusal(4 * GIB, machine(available=2 * GIB, reserved=GIB), idle)
    assert err.reason == "memory_short"
    assert "3.00 GiB" in err.message  # what could be freed: 1 GiB free now plus 2 idle


def test_reserved_above_available_says_zero_can_be_freed() -> None:
    err = refusal(GIB, machine(available=GIB, reserved=3 * GIB))
    assert err.reason == "memory_short"
    assert "only 0.00 GiB" in err.message


# --- plan: room and eviction --------------------------------------------------------------------


def test_fits_now_evicts_nobody() -> None:
    idle = [Idle("r-a", GIB, 1.0)]
    assert plan(GIB, machine(available=2 * GIB, reserved=GIB), idle) == []  # exactly fits


def test_evicts_least_recently_used_first_and_no_more_than_needed() -> None:
    idle = [Idle("r-new", GIB, 30.0), Idle("r-old", GIB, 10.0), Idle("r-mid", GIB, 20.0)]
    memory = machine(available=GIB + 512 * MIB, reserved=GIB)  # 0.5 GiB free now
    assert plan(GIB, memory, idle) == ["r-old"]
    assert plan(2 * GIB, memory, idle) == ["r-old", "r-mid"]
    assert plan(3 * GIB, memory, idle) == ["r-old", "r-mid", "r-new"]


def test_an_idle_runner_of_unknown_size_is_evicted_but_frees_nothing() -> None:
    idle = [Idle("r-unmeasured", 0, 1.0), Idle("r-big", 4 * GIB, 2.0)]
    assert plan(2 * GIB, machine(available=GIB, reserved=GIB), idle) == ["r-unmeasured", "r-big"]


def rule(need: int, memory: Memory, idle: list[Idle]) -> list[str] | str:
    """The shortest prefix of the idle runners by last use that makes room, or the refusal."""
    if need > memory.cap or need > memory.total - memory.reserved:
        return "model_too_large"
    by_age = sorted(idle, key=lambda r: r.last_used)
    for n in range(len(by_age) + 1):
        freed = sum(r.memory for r in by_age[:n])
        if memory.available - memory.reserved + freed >= need:
            return [r.runner_id for r in by_age[:n]]
    return "memory_short"


def test_plan_follows_the_rule_over_many_machines() -> None:
    rng = random.Random(3)
    sizes = [0, 1, 2, 3, 4, 6, 8]
    checked = 0
    for need, cap, total, available, reserved in itertools.product(
        [1, 2, 3, 5, 8], [2, 4, 8], [4, 8], [0, 1, 3, 8], [0, 1, 2]
    ):
        for _ in range(4):
            idle = [
                Idle(f"r-{i}", rng.choice(sizes) * GIB, rng.random())
                for i in range(rng.randint(0, 4))
            ]
            memory = Memory(
                cap=cap * GIB, total=total * GIB, available=available * GIB, reserved=reserved * GIB
            )
            expected = rule(need * GIB, memory, idle)
            try:
                got: list[str] | str = plan(need * GIB, memory, idle)
            except ExoError as e:
                got = e.reason
            assert got == expected, (need, memory, idle)
            checked += 1
    assert checked == 5 * 3 * 2 * 4 * 3 * 4


def test_plan_does_not_depend_on_the_order_it_is_given() -> None:
    idle = [Idle(f"r-{i}", GIB, float(i)) for i in range(5)]
    memory = machine(available=GIB, reserved=GIB)
    expected = plan(3 * GIB, memory, idle)
    assert expected == ["r-0", "r-1", "r-2"]
    assert plan(3 * GIB, memory, list(reversed(idle))) == expected
    assert plan(3 * GIB, memory, idle[2:] + idle[:2]) == expected
