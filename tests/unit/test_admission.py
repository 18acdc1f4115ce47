"""admission: whether a new runner may start and who makes room; when a generation may start.

All pure. plan is checked case by case at every boundary, then against a brute-force statement
of the rule over many small machines: refuse for good (65) what can never fit, evict idle runners
least recently used first and no more than needed, refuse for now (75) what does not fit even
then. The same for a generation's memory: its reservation, refused for good when it cannot fit
beside the model even alone, and may_start against its rule over a grid of runners.
"""

from __future__ import annotations

import itertools
import random

import pytest

from exod.errors import REASONS, Exit, ExoError
from exod.proto.exo.v1 import runner_pb2
from exod.runners.admission import (
    RUNTIME_OVERHEAD,
    TEMPLATE_TOKENS,
    TEMPLATE_TOKENS_PER_MESSAGE,
    WEIGHT_FACTOR,
    Idle,
    Memory,
    Occupancy,
    check_alone,
    estimate,
    may_start,
    plan,
    prompt_tokens_bound,
    reservation,
)
from exod.runners.dispatch import need_of

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


# --- a generation's reservation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text_bytes", "messages", "limit", "expected"),
    [
        (0, 0, 0, TEMPLATE_TOKENS),
        (10, 0, 0, 10 + TEMPLATE_TOKENS),
        (10, 1, 0, 10 + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE),
        (1000, 3, 0, 1000 + TEMPLATE_TOKENS + 3 * TEMPLATE_TOKENS_PER_MESSAGE),
        # the runner refuses a prompt over its limit before any KV is made
        (1000, 3, 500, 500),
        (10, 0, 10 + TEMPLATE_TOKENS, 10 + TEMPLATE_TOKENS),
        (10, 0, 10 + TEMPLATE_TOKENS + 1, 10 + TEMPLATE_TOKENS),
    ],
)
def test_prompt_tokens_are_bounded_by_bytes_plus_the_template(
    text_bytes: int, messages: int, limit: int, expected: int
) -> None:
    assert prompt_tokens_bound(text_bytes, messages, limit) == expected


def test_the_bound_grows_with_the_prompt_and_never_passes_the_limit() -> None:
    for limit in (0, 1, 100, 32768):
        bounds = [prompt_tokens_bound(n, m, limit) for n in range(0, 3000, 97) for m in (0, 2)]
        if limit:
            assert max(bounds) <= limit
        for n in range(0, 3000, 97):
            assert prompt_tokens_bound(n, 1, limit) <= prompt_tokens_bound(n + 1, 1, limit)
            assert prompt_tokens_bound(n, 1, limit) <= prompt_tokens_bound(n, 2, limit)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "kv", "expected"),
    [
        (10, 90, 512, 100 * 512),
        (0, 1, 1, 1),
        (100, 0, 512, 100 * 512),
        (10, 90, 0, 0),  # KV size unknown: nothing to reserve by
        (-5, 10, 2, 20),  # nonsense counts as nothing, never as a credit
        (10, -5, 2, 20),
        (10, 10, -2, 0),
    ],
)
def test_reservation_is_prompt_plus_max_tokens_times_kv_bytes(
    prompt: int, max_tokens: int, kv: int, expected: int
) -> None:
    assert reservation(prompt, max_tokens, kv) == expected


def test_need_of_bounds_a_prompt_or_chat_messages_by_their_utf8_bytes() -> None:
    raw = runner_pb2.Generate(prompt="héllo", max_tokens=10, max_prompt_tokens=32768)
    assert need_of(raw, 4) == (6 + TEMPLATE_TOKENS + 10) * 4  # "é" is two bytes
    chat = runner_pb2.Generate(
        messages=[
            runner_pb2.ChatMessage(role="system", content="abc"),
            runner_pb2.ChatMessage(role="user", content="你好"),  # six bytes
        ],
        max_tokens=7,
        max_prompt_tokens=32768,
    )
    per_messages = TEMPLATE_TOKENS + 2 * TEMPLATE_TOKENS_PER_MESSAGE
    assert need_of(chat, 2) == (3 + 6 + per_messages + 7) * 2
    capped = runner_pb2.Generate(prompt="x" * 5000, max_tokens=1, max_prompt_tokens=100)
    assert need_of(capped, 1) == 101


def test_a_run_that_cannot_fit_beside_the_model_even_alone_is_refused_for_good() -> None:
    check_alone(GIB, 7 * GIB, 8 * GIB)  # exactly the cap fits
    with pytest.raises(ExoError) as raised:
        check_alone(GIB + 1, 7 * GIB, 8 * GIB)
    err = raised.value
    assert err.reason == "model_too_large"
    assert REASONS[err.reason].exit == Exit.CANNOT_RUN
    assert "1.00 GiB of KV cache" in err.message and "model's 7.00 GiB" in err.message
    assert "cap of 8.00 GiB" in err.message
    assert "max_tokens" in err.message and "EXOD_MAX_RUNNER_MEMORY" in err.message
    assert "\n" not in err.message
    with pytest.raises(ExoError, match=r"need 2 MiB of KV cache .* model.s 100 MiB.* of 101 MiB"):
        check_alone(2 * MIB, 100 * MIB, 101 * MIB)


def occupancy(
    *,
    cap: int = 1000,
    model: int = 100,
    measured: int | None = 150,
    reserved: int = 0,
    active: int = 0,
    parallel: int = 4,
) -> Occupancy:
    return Occupancy(cap, model, measured, reserved, active, parallel)


@pytest.mark.parametrize(
    ("o", "need", "expected"),
    [
        # alone it always starts: nothing it could wait for would free memory
        (occupancy(active=0, measured=10**6), 10**6, True),
        # beside others: measured + reserved + its own under the cap
        (occupancy(active=1, reserved=300, measured=200), 500, True),  # exactly the cap
        (occupancy(active=1, reserved=300, measured=200), 501, False),
        (occupancy(active=3, reserved=0, measured=0), 1000, True),
        # not measured yet: the model's memory stands in
        (occupancy(active=1, reserved=300, measured=None, model=200), 500, True),
        (occupancy(active=1, reserved=300, measured=None, model=201), 500, False),
        # the batch is full, whatever the memory
        (occupancy(active=4, parallel=4, measured=0), 0, False),
        (occupancy(active=0, parallel=1), 0, True),
        (occupancy(active=1, parallel=1, measured=0), 0, False),
    ],
)
def test_may_start_table(o: Occupancy, need: int, expected: bool) -> None:
    assert may_start(o, need) is expected


def start_rule(o: Occupancy, need: int) -> bool:
    """Room in the batch; and alone, or every reservation beside the memory now under the cap."""
    if o.active >= o.parallel:
        return False
    now = o.model if o.measured is None else o.measured
    return o.active == 0 or o.reserved + now + need <= o.cap


def test_may_start_follows_the_rule_over_a_grid() -> None:
    checked = 0
    for cap, model, measured, reserved, active, parallel, need in itertools.product(
        [0, 4, 8], [0, 3], [None, 0, 2, 5], [0, 1, 4], [0, 1, 2, 4], [1, 2, 4], [0, 1, 3, 9]
    ):
        o = Occupancy(cap, model, measured, reserved, active, parallel)
        assert may_start(o, need) is start_rule(o, need), (o, need)
        # more memory in use never lets a run start that would not start with less
        if may_start(o, need) and measured is not None:
            assert may_start(Occupancy(cap, model, measured - 1, reserved, active, parallel), need)
        checked += 1
    assert checked == 3 * 2 * 4 * 3 * 4 * 3 * 4
