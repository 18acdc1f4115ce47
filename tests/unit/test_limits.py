"""limits.verdict: which limit a runner has broken, for every state, clock and memory reading.

The verdict is pure, so it is checked here against a table of cases at and around every
boundary, and then against an independent statement of the rules over a grid of all the inputs.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from exod.config import load
from exod.runners.limits import Limits, Watch, verdict

LIMITS = Limits(load_stall=10.0, load_timeout=100.0, decode_stall=20.0, memory_cap=1000)
STATES = ("loading", "ready", "running", "stopping")
T0 = 5000.0  # the monotonic clock does not start at 0


def watch(
    state: str,
    *,
    age: float = 0.0,
    quiet: float = 0.0,
    decoding: bool = False,
    memory: int | None = None,
) -> Watch:
    """A runner spawned `age` seconds ago whose last progress was `quiet` seconds ago."""
    now = T0 + age
    return Watch(
        state=state,
        now=now,
        spawned_at=T0,
        last_progress=now - quiet,
        decoding=decoding,
        memory=memory,
    )


def reason(w: Watch, limits: Limits = LIMITS) -> str | None:
    found = verdict(limits, w)
    return None if found is None else found[0]


# --- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "expected"),
    [
        # loading: quiet for the stall timeout is still fine, a moment longer is not
        (watch("loading", age=10, quiet=10), None),
        (watch("loading", age=10.01, quiet=10.01), "load_stall"),
        (watch("loading", age=50, quiet=9.99), None),
        # loading: the overall timeout, however steady the progress
        (watch("loading", age=100, quiet=0), None),
        (watch("loading", age=100.01, quiet=0), "load_timeout"),
        # both broken: the overall timeout is the one named
        (watch("loading", age=200, quiet=50), "load_timeout"),
        # running, in prefill (no token yet): answers to the load stall timeout
        (watch("running", age=500, quiet=10), None),
        (watch("running", age=500, quiet=10.01), "decode_stall"),
        # running, decoding: answers to the decode stall timeout, not the load one
        (watch("running", age=500, quiet=15, decoding=True), None),
        (watch("running", age=500, quiet=20, decoding=True), None),
        (watch("running", age=500, quiet=20.01, decoding=True), "decode_stall"),
        # a running runner has no overall time limit
        (watch("running", age=1e6, quiet=1, decoding=True), None),
        # ready: no clock applies, however long it has been quiet
        (watch("ready", age=1e6, quiet=1e6), None),
        # memory: the cap itself is allowed, a byte more is not, in every live state
        (watch("ready", memory=1000), None),
        (watch("ready", memory=1001), "memory_limit"),
        (watch("loading", memory=1001), "memory_limit"),
        (watch("running", memory=1001, decoding=True), "memory_limit"),
        # memory is named before any clock
        (watch("loading", age=200, quiet=50, memory=5000), "memory_limit"),
        (watch("running", quiet=50, memory=5000, decoding=True), "memory_limit"),
        # not measured yet: no memory verdict
        (watch("ready", memory=None), None),
        # stopping: already being ended, nothing more to say
        (watch("stopping", age=1e6, quiet=1e6, memory=10**12), None),
    ],
)
def test_verdict_table(w: Watch, expected: str | None) -> None:
    assert reason(w) == expected


def test_a_zero_cap_means_no_memory_limit() -> None:
    no_cap = Limits(load_stall=10, load_timeout=100, decode_stall=20, memory_cap=0)
    assert reason(watch("ready", memory=10**15), no_cap) is None


def test_details_say_what_was_seen_and_which_setting_to_change() -> None:
    cases = {
        "load_stall": (
            watch("loading", age=12, quiet=12.5),
            ["12.5s", "EXOD_LOAD_STALL_TIMEOUT=10"],
        ),
        "load_timeout": (watch("loading", age=101), ["100s", "EXOD_LOAD_TIMEOUT"]),
        "memory_limit": (
            watch("ready", memory=3 << 20),
            ["3 MiB", "EXOD_MAX_RUNNER_MEMORY"],
        ),
    }
    mem = Limits(load_stall=10, load_timeout=100, decode_stall=20, memory_cap=2 << 20)
    for name, (w, words) in cases.items():
        found = verdict(mem if name == "memory_limit" else LIMITS, w)
        assert found is not None and found[0] == name
        for word in words:
            assert word in found[1], (name, found[1])
    prefill = verdict(LIMITS, watch("running", quiet=11))
    assert prefill is not None
    assert "prefill" in prefill[1] and "EXOD_LOAD_STALL_TIMEOUT=10" in prefill[1]
    decode = verdict(LIMITS, watch("running", quiet=21, decoding=True))
    assert decode is not None
    assert "no token for 21.0s" in decode[1] and "EXOD_DECODE_STALL_TIMEOUT=20" in decode[1]


# --- the grid ------------------------------------------------------------------------------------


def rules(limits: Limits, w: Watch) -> str | None:
    """The contract of docs/configuration.md, written out once more, independently."""
    if w.state == "stopping":
        return None
    if w.memory is not None and limits.memory_cap > 0 and w.memory > limits.memory_cap:
        return "memory_limit"
    quiet = w.now - w.last_progress
    if w.state == "loading":
        if w.now - w.spawned_at > limits.load_timeout:
            return "load_timeout"
        return "load_stall" if quiet > limits.load_stall else None
    if w.state == "running":
        allowed = limits.decode_stall if w.decoding else limits.load_stall
        return "decode_stall" if quiet > allowed else None
    return None


def test_verdict_follows_the_rules_over_a_grid() -> None:
    seconds = (0.0, 5.0, 9.99, 10.0, 10.01, 19.99, 20.0, 20.01, 99.0, 100.0, 100.01, 1e5)
    memories = (None, 0, 999, 1000, 1001, 10**12)
    checked = 0
    for state, age, quiet, decoding, memory in itertools.product(
        STATES, seconds, seconds, (False, True), memories
    ):
        if quiet > age:
            continue  # no progress can predate the spawn
        w = watch(state, age=age, quiet=quiet, decoding=decoding, memory=memory)
        assert reason(w) == rules(LIMITS, w), w
        checked += 1
    assert checked > 3000


def test_limits_come_from_the_settings(tmp_path: Path) -> None:
    settings = load(
        {},
        {
            "EXOD_HOME": str(tmp_path),
            "EXOD_LOAD_STALL_TIMEOUT": "2.5",
            "EXOD_LOAD_TIMEOUT": "30",
            "EXOD_DECODE_STALL_TIMEOUT": "4",
            "EXOD_MAX_RUNNER_MEMORY": "300M",
        },
    )
    assert Limits.from_settings(settings) == Limits(
        load_stall=2.5, load_timeout=30.0, decode_stall=4.0, memory_cap=300 << 20
    )
