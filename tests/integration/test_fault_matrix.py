"""The fault matrix: faults injected into real runners in every phase of their life.

Phases: spawn (the wrapper has not started the runner yet), loading, ready (loaded, idle),
prefill (a run sent, no token yet), decoding, queued (a run waiting behind a full batch: one
place, EXOD_PARALLEL=1), idle (the idle TTL). Faults: SIGKILL, SIGTERM, SIGSEGV and SIGSTOP to the
runner process or its whole group, `exoctl kill`, a client that cancels (SIGINT) or drops its
stream (SIGKILL), a wrapper that exits at spawn or hangs before it starts the runner, a run left
waiting past EXOD_QUEUE_TIMEOUT, the memory cap, the idle TTL.

After every fault: no process of that runner's group is left (the wrapper's own child
included), the same exod serves on, every client got the exit code and reason of the fault, and
the log names it: RunnerFailed (with the signal or exit status of a crash) or RunnerStopped for
the runner, RunFinished for each run. A cancel and a queue timeout end a run, not the runner: it
must go on serving, and is then killed to check that nothing of it is left either.

Daemons are shared per configuration (module scope); every fault starts and ends with no runner.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, pids_alive, read_some, timestamp, wait_until
from tests.faults import (
    LONG,
    PROMPT,
    WRAPPER,
    Group,
    arm_wrapper,
    big_model,
    client_outcome,
    next_group,
    of_kind,
    ready_group,
    shims,
    wait_state,
    wrapper_children,
)

LOAD_STALL = 3.0
DECODE_STALL = 2.0
QUEUE_TIMEOUT = 5.0
IDLE_TTL = 2.0
GRACE = 1.0
CONFIGS = {
    "base": {
        "EXOD_RUNNER_WRAPPER": str(WRAPPER),
        "EXOD_LOAD_STALL_TIMEOUT": str(LOAD_STALL),
        "EXOD_DECODE_STALL_TIMEOUT": str(DECODE_STALL),
        "EXOD_QUEUE_TIMEOUT": str(QUEUE_TIMEOUT),
        "EXOD_KILL_GRACE": str(GRACE),
        "EXOD_MAX_RUNNER_MEMORY": "300M",  # a tiny runner takes about 100 MiB
    },
    # One generation at a time, so that a second run waits in the queue; long enough a queue
    # timeout that the wait is seen (each look is an `exoctl status`: seconds on a busy machine).
    "serial": {
        "EXOD_RUNNER_WRAPPER": str(WRAPPER),
        "EXOD_LOAD_STALL_TIMEOUT": str(LOAD_STALL),
        "EXOD_DECODE_STALL_TIMEOUT": str(DECODE_STALL),
        "EXOD_QUEUE_TIMEOUT": "120",
        "EXOD_KILL_GRACE": str(GRACE),
        "EXOD_MAX_RUNNER_MEMORY": "300M",
        "EXOD_PARALLEL": "1",
    },
    # The same, for the fault that is the queue timeout itself.
    "serial-timeout": {
        "EXOD_RUNNER_WRAPPER": str(WRAPPER),
        "EXOD_LOAD_STALL_TIMEOUT": str(LOAD_STALL),
        "EXOD_DECODE_STALL_TIMEOUT": str(DECODE_STALL),
        "EXOD_QUEUE_TIMEOUT": str(QUEUE_TIMEOUT),
        "EXOD_KILL_GRACE": str(GRACE),
        "EXOD_MAX_RUNNER_MEMORY": "300M",
        "EXOD_PARALLEL": "1",
    },
    "idle": {
        "EXOD_RUNNER_WRAPPER": str(WRAPPER),
        "EXOD_IDLE_TTL": str(IDLE_TTL),
        "EXOD_KILL_GRACE": str(GRACE),
    },
}
CANCELLED = "cancelled"
DROPPED = "dropped"  # the client was SIGKILLed: its run is logged as cancelled


@dataclass(frozen=True)
class Fault:
    phase: str
    action: str
    # How the runner ends: "crashed:SIG" / "crashed:exit N" / a RunnerFailed or RunnerStopped
    # reason / "kept" (the runner serves on; the test kills it afterwards).
    runner: str
    # The reason each client run ends with, in the order they were started.
    runs: tuple[str, ...] = ()
    config: str = "base"

    def __str__(self) -> str:
        return f"{self.phase}-{self.action.replace(' ', '-')}"


FAULTS = [
    # spawn: the wrapper runs, the runner has not started
    Fault("spawn", "wrapper exit 3", "crashed:exit 3", ("crashed",)),
    Fault("spawn", "wrapper hang", "load_stall", ("load_stall",)),
    Fault("spawn", "SIGKILL group", "crashed:SIGKILL", ("crashed",)),
    Fault("spawn", "SIGTERM group", "crashed:SIGTERM", ("crashed",)),
    Fault("spawn", "exoctl kill", "killed", ("killed",)),
    # loading: the runner imports MLX and loads the model
    Fault("loading", "SIGKILL runner", "crashed:SIGKILL", ("crashed",)),
    Fault("loading", "SIGTERM group", "crashed:SIGTERM", ("crashed",)),
    Fault("loading", "SIGSEGV runner", "crashed:SIGSEGV", ("crashed",)),
    Fault("loading", "SIGSTOP group", "load_stall", ("load_stall",)),
    Fault("loading", "exoctl kill", "killed", ("killed",)),
    Fault("loading", "cancel", "kept", (CANCELLED,)),
    Fault("loading", "memory cap", "memory_limit", ("memory_limit",)),
    # ready: loaded, nothing to do
    Fault("ready", "SIGKILL group", "crashed:SIGKILL"),
    Fault("ready", "SIGTERM runner", "crashed:SIGTERM"),
    Fault("ready", "exoctl kill", "killed"),
    # prefill: a run was sent and no token came yet (the runner is held with SIGSTOP to stay
    # there; the fault comes on top)
    Fault("prefill", "SIGKILL runner", "crashed:SIGKILL", ("crashed",)),
    Fault("prefill", "SIGTERM group", "crashed:SIGTERM", ("crashed",)),
    Fault("prefill", "SIGSTOP group", "decode_stall", ("decode_stall",)),
    Fault("prefill", "exoctl kill", "killed", ("killed",)),
    Fault("prefill", "cancel", "kept", (CANCELLED,)),
    # decoding: tokens are flowing
    Fault("decoding", "SIGKILL runner", "crashed:SIGKILL", ("crashed",)),
    Fault("decoding", "SIGTERM runner", "crashed:SIGTERM", ("crashed",)),
    Fault("decoding", "SIGSEGV runner", "crashed:SIGSEGV", ("crashed",)),
    Fault("decoding", "SIGSTOP group", "decode_stall", ("decode_stall",)),
    Fault("decoding", "SIGSTOP runner", "decode_stall", ("decode_stall",)),
    Fault("decoding", "exoctl kill", "killed", ("killed",)),
    Fault("decoding", "cancel", "kept", (CANCELLED,)),
    Fault("decoding", "drop", "kept", (DROPPED,)),
    # queued: a second run waits behind a generation that fills the batch
    Fault("queued", "cancel", "kept", ("killed", CANCELLED), config="serial"),
    Fault("queued", "queue timeout", "kept", ("killed", "queue_timeout"), config="serial-timeout"),
    Fault("queued", "SIGKILL runner", "crashed:SIGKILL", ("crashed", "crashed"), config="serial"),
    Fault("queued", "exoctl kill", "killed", ("killed", "killed"), config="serial"),
    # idle: the idle TTL, also for a runner that cannot act on SIGTERM until it gets SIGCONT
    Fault("idle", "idle TTL", "idle", config="idle"),
    Fault("idle", "SIGSTOP group", "idle", config="idle"),
]


# --- daemons -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Daemon]]:
    """One exod per configuration, started on first use and ended (checked for leaks) at the
    end of the module."""
    made: dict[str, Daemon] = {}

    def get(config: str) -> Daemon:
        if config not in made:
            home = tmp_path_factory.mktemp(f"faults-{config}") / "home"
            made[config] = Daemon.create(home, **CONFIGS[config]).start()
        return made[config]

    yield get
    leaks = {config: d.cleanup() for config, d in made.items()}
    for d in made.values():
        shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert not any(leaks.values()), f"runners outlived exod: {leaks}"


# --- a trial: put a runner in a phase, inject the fault ------------------------------------------


@dataclass
class Trial:
    d: Daemon
    group: Group | None = None
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    outcomes: dict[int, tuple[int, list[Any]]] = field(default_factory=dict)

    def run(self, model: Path, *extra: str) -> subprocess.Popen[bytes]:
        client = self.d.exoctl_bg("run", str(model), PROMPT, "--max-tokens", LONG, "--json", *extra)
        self.clients.append(client)
        self.heads.append(b"")
        return client

    def first_token(self, index: int) -> None:
        self.heads[index] = read_some(self.clients[index])

    def outcome(self, index: int) -> tuple[int, list[Any]]:
        """Exit code and JSON lines of a client, once it has ended."""
        if index not in self.outcomes:
            self.outcomes[index] = client_outcome(self.clients[index], self.heads[index])
        return self.outcomes[index]

    @property
    def runner(self) -> Group:
        assert self.group is not None
        return self.group


def inject(t: Trial, action: str) -> None:
    if action.startswith("SIG"):
        name, target = action.split()
        sig = signal.Signals[name]
        if target == "group":
            t.runner.kill(sig)
        else:
            t.runner.kill_runner(sig)
    elif action == "exoctl kill":
        result = t.d.exoctl("kill", t.runner.runner_id)
        assert result.code == 0, result
    elif action == "cancel":
        t.clients[-1].send_signal(signal.SIGINT)
    elif action == "drop":
        t.clients[-1].kill()
    else:
        raise AssertionError(f"no such fault: {action}")


def at_spawn(t: Trial, fault: Fault, model: Path) -> None:
    if fault.action == "wrapper exit 3":
        arm_wrapper(t.d, "exit 3")
        t.run(model)
        t.clients[0].wait(timeout=60)  # the group lives for milliseconds: look it up afterwards
        (spawned,) = of_kind(t.d.events(), "RunnerSpawned")[-1:]
        t.group = Group(spawned["runner_id"], spawned["pid"])
        return
    arm_wrapper(t.d, "hang")
    t.run(model)
    t.group = next_group(t.d)
    # The wrapper hangs: shim, shell, its `sleep &` and the `sleep` it waits for; no runner.
    assert wait_until(lambda: len(t.runner.members()) == 4, timeout=10), t.runner.members()
    assert t.runner.runner_pid() is None
    if fault.action != "wrapper hang":
        inject(t, fault.action)


def at_loading(t: Trial, fault: Fault, model: Path) -> None:
    if fault.action == "memory cap":
        t.run(big_model(), "--force")  # --force: past the estimate, into the cap
        t.group = next_group(t.d)
        return
    t.run(model)
    t.group = next_group(t.d)
    t.runner.wait_runner_pid()  # the runner has started: imports and loading take seconds
    inject(t, fault.action)


def at_ready(t: Trial, fault: Fault, model: Path) -> None:
    t.group = ready_group(t.d, model)
    inject(t, fault.action)


def at_prefill(t: Trial, fault: Fault, model: Path) -> None:
    t.group = ready_group(t.d, model)
    t.runner.kill(signal.SIGSTOP)  # holds the runner before its first token
    t.run(model)
    wait_state(t.d, t.runner.runner_id, lambda r: r["state"] == "running")
    inject(t, fault.action)
    if fault.action == "cancel":
        assert t.clients[0].wait(timeout=30) == 130
    if fault.action != "SIGSTOP group":
        with contextlib.suppress(ProcessLookupError):  # gone already (exoctl kill waits for it)
            t.runner.kill(signal.SIGCONT)  # let what is left of it act on the fault


def at_decoding(t: Trial, fault: Fault, model: Path) -> None:
    t.group = ready_group(t.d, model)
    t.run(model)
    t.first_token(0)
    inject(t, fault.action)


def at_queued(t: Trial, fault: Fault, model: Path) -> None:
    t.group = ready_group(t.d, model)
    t.run(model)
    t.first_token(0)
    t.run(model)
    if fault.action == "queue timeout":
        t.outcome(1)  # its wait is checked against the log's timestamps below
        return
    wait_state(t.d, t.runner.runner_id, lambda r: r["queued"] == 1, t.clients[1])
    inject(t, fault.action)


def at_idle(t: Trial, fault: Fault, model: Path) -> None:
    result = t.d.exoctl("run", str(model), PROMPT, "--max-tokens", "1")
    assert result.code == 0, result
    (spawned,) = of_kind(t.d.events(), "RunnerSpawned")[-1:]
    t.group = Group(spawned["runner_id"], spawned["pid"])
    if fault.action == "SIGSTOP group":
        inject(t, fault.action)


PHASES: dict[str, Callable[[Trial, Fault, Path], None]] = {
    "spawn": at_spawn,
    "loading": at_loading,
    "ready": at_ready,
    "prefill": at_prefill,
    "decoding": at_decoding,
    "queued": at_queued,
    "idle": at_idle,
}


# --- the test ------------------------------------------------------------------------------------


def ts(event: dict[str, Any]) -> float:
    return timestamp(event["ts"])


def check_client(t: Trial, index: int, reason: str, fault: Fault) -> None:
    """The client's exit code and last JSON line say why its run ended."""
    client = t.clients[index]
    if reason == DROPPED:
        client.wait(timeout=30)
        return
    code, lines = t.outcome(index)
    assert code == (130 if reason == CANCELLED else 75), (fault, lines)
    assert lines[-1]["type"] == "error", lines
    assert lines[-1]["reason"] == reason, lines
    if fault.phase in ("spawn", "loading", "prefill") and fault.action != "memory cap":
        assert [line for line in lines if line["type"] == "token"] == [], "not in its phase"


@pytest.mark.parametrize("fault", FAULTS, ids=str)
def test_fault(fault: Fault, daemons: Callable[[str], Daemon], qwen2: Path) -> None:
    d = daemons(fault.config)
    assert shims(d) == {}, "a runner of an earlier fault is still there"
    children = len(wrapper_children(d))
    t = Trial(d)
    PHASES[fault.phase](t, fault, qwen2)
    group = t.runner
    kept = fault.runner == "kept"

    # Each client ends with the fault's exit code and reason.
    for i, reason in enumerate(fault.runs):
        if not (kept and reason == "killed"):  # the generation a queued run waited behind
            check_client(t, i, reason, fault)

    # A run ended by a cancel or a queue timeout leaves its runner serving; then it is killed.
    if kept:
        busy = "running" if fault.phase == "queued" else "ready"
        wait_state(d, group.runner_id, lambda r: r["state"] == busy and r["queued"] == 0)
        assert group.members(), "the runner did not outlive the end of a run"
        result = d.exoctl("kill", group.runner_id)
        assert result.code == 0, result
        for i, reason in enumerate(fault.runs):
            if reason == "killed":
                check_client(t, i, reason, fault)

    # Nothing of the runner is left, the wrapper's child included.
    group.wait_gone(time.monotonic(), timeout=LOAD_STALL + GRACE + 15)
    new_children = wrapper_children(d)[children:]
    assert new_children, "the wrapper started no child"
    assert pids_alive(new_children) == []

    # The same exod serves on, and has seen the runner go (it reaps it within a second or so of
    # its end: a status taken at the very moment the group is gone may still show it).
    assert d.alive()

    def live(status: dict[str, Any]) -> list[dict[str, Any]]:
        return [r for r in status["runners"] if r["state"] in {"loading", "ready", "running"}]

    assert wait_until(lambda: live(d.status()) == [], timeout=2.0), d.status()
    status = d.status()
    assert status["pid"] == d.pid
    (shown,) = [r for r in status["runners"] if r["id"] == group.runner_id]

    # The log names the fault: how the runner ended, and how each run did.
    events = d.events()
    ends = [
        e
        for e in events
        if e["kind"] in {"RunnerFailed", "RunnerStopped"} and e["runner_id"] == group.runner_id
    ]
    assert len(ends) == 1, ends
    (end,) = ends
    want = "killed" if kept else fault.runner
    if want.startswith("crashed:"):
        assert (end["kind"], end["reason"]) == ("RunnerFailed", "crashed")
        how = want.split(":", 1)[1]
        if how.startswith("exit "):
            assert (end["exit_status"], end["signal"]) == (int(how.split()[1]), 0)
        else:
            assert (end["exit_status"], end["signal"]) == (0, signal.Signals[how].value)
        assert (shown["state"], shown["last_error"]["reason"]) == ("failed", "crashed")
    else:
        kind = "RunnerStopped" if want in {"killed", "idle"} else "RunnerFailed"
        assert (end["kind"], end["reason"]) == (kind, want)
        if kind == "RunnerFailed":
            assert (shown["state"], shown["last_error"]["reason"]) == ("failed", want)
        else:
            assert shown["state"] == "stopped"
    if fault.phase in ("spawn", "loading") and not kept and fault.action != "memory cap":
        assert of_kind(events, "RunnerReady", runner_id=group.runner_id) == []

    accepted = of_kind(events, "RunAccepted", runner_id=group.runner_id, max_tokens=int(LONG))
    assert len(accepted) == len(fault.runs)
    for run, reason in zip(accepted, fault.runs, strict=True):
        (finished,) = of_kind(events, "RunFinished", run_id=run["run_id"])
        if reason in (CANCELLED, DROPPED):
            assert (finished["stop_reason"], finished["reason"]) == ("cancelled", "cancelled")
        else:
            assert finished["reason"] == reason
        if reason == "queue_timeout":  # refused once it had waited for the timeout, not later
            waited = ts(finished) - ts(run)
            assert QUEUE_TIMEOUT <= waited <= QUEUE_TIMEOUT + 2, waited
