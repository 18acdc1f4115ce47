"""Many runs at once on one runner (EXOD_PARALLEL), on real exod, exoctl and runners.

Runs on one runner overlap in time; the queue holds the rest, in order, with their positions; a
run waits while its memory does not fit beside the others and is refused (65) when it could never
fit; a runner that dies fails each of its runs, running or waiting, with its own RunFinished.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil

from exod.models.inspect import kv_bytes_per_token, read_config
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc
from tests.daemon import Daemon, Event, read_some, stderr_of, wait_until
from tests.faults import LONG, PROMPT, is_runner, of_kind, runner_status, wait_state
from tests.reference import expected

SHORT_PROMPT = "The quick brown fox"


def started(made: list[Daemon], home: Path, **env: str) -> Daemon:
    d = Daemon.create(home, **env)
    made.append(d)
    return d.start()


def warm(d: Daemon, model: Path) -> dict[str, Any]:
    """Load the model with a one-token run; the runner's status, idle."""
    result = d.exoctl("run", str(model), PROMPT, "--max-tokens", "1")
    assert result.code == 0, result
    (runner,) = [r for r in d.status()["runners"] if r["state"] == "ready"]
    assert isinstance(runner, dict)
    return runner


def finished(events: list[Event], run_id: str) -> Event:
    (event,) = of_kind(events, "RunFinished", run_id=run_id)
    return event


def first_reply(stream: grpc.CallIterator[control_pb2.RunReply]) -> control_pb2.RunReply:
    for reply in stream:
        return reply
    raise AssertionError("the run's stream ended without a reply")


def leave(stream: grpc.CallIterator[control_pb2.RunReply]) -> None:
    stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel unannotated


def one_line(text: str) -> bool:
    return text.endswith("\n") and text.count("\n") == 1 and "Traceback" not in text


@contextmanager
def grpc_runs(d: Daemon) -> Iterator[control_pb2_grpc.ControlStub]:
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield control_pb2_grpc.ControlStub(channel)


def test_runs_on_one_runner_overlap_in_time(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    """Needs the batching runner: a short run starts and ends while a long one decodes beside it
    (one at a time, it would wait minutes for the long one), and its text is its text alone."""
    d = started(daemon_factory, tmp_path / "home", EXOD_PARALLEL="4")
    runner = warm(d, qwen2)
    long = d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG)
    read_some(long)  # it decodes
    short = d.exoctl("run", str(qwen2), SHORT_PROMPT, "--max-tokens", "8", timeout=60)
    assert short.code == 0, short
    assert short.stdout == expected(qwen2, SHORT_PROMPT, 8, chat=True).stdout
    assert long.poll() is None, "the long run ended first: the runs did not overlap"
    shown = runner_status(d, runner["id"])
    assert (shown["state"], shown["active"], shown["queued"]) == ("running", 1, 0)
    long.send_signal(signal.SIGINT)
    assert long.wait(timeout=30) == 130
    long_id, short_id = (e["run_id"] for e in of_kind(d.events(), "RunAccepted")[1:])
    d.wait_event(lambda e: e["kind"] == "RunFinished" and e["run_id"] == long_id)
    events = d.events()
    assert finished(events, short_id)["seq"] < finished(events, long_id)["seq"]
    assert finished(events, long_id)["stop_reason"] == "cancelled"
    assert len(of_kind(events, "RunnerSpawned")) == 1


def test_queue_positions_count_the_runs_waiting_ahead(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    """With two places, two runs start at once (position 0) and the next wait in order
    (positions 1, 2); `exoctl status` shows two active and two queued; a queued run that leaves
    frees its place in the queue."""
    d = started(daemon_factory, tmp_path / "home", EXOD_PARALLEL="2")
    runner = warm(d, qwen2)
    request = control_pb2.RunRequest(model=str(qwen2), prompt=PROMPT, max_tokens=int(LONG))
    with grpc_runs(d) as stub:
        streams: list[grpc.CallIterator[control_pb2.RunReply]] = []
        try:
            positions = []
            for _ in range(4):  # one after the other: each is placed before the next is sent
                streams.append(stub.Run(request, timeout=60))
                positions.append(first_reply(streams[-1]).started.queue_position)
            assert positions == [0, 0, 1, 2]
            shown = runner_status(d, runner["id"])
            assert (shown["state"], shown["active"], shown["queued"]) == ("running", 2, 2)
            leave(streams[2])  # the first in line leaves: the last moves up
            wait_state(d, runner["id"], lambda r: r["queued"] == 1 and r["active"] == 2)
            late = stub.Run(request, timeout=60)
            streams.append(late)
            assert first_reply(late).started.queue_position == 2
        finally:
            for s in streams:
                leave(s)
    wait_state(d, runner["id"], lambda r: r["state"] == "ready" and r["queued"] == 0)
    assert runner_status(d, runner["id"])["active"] == 0


def test_a_run_beyond_the_queue_depth_is_refused_with_75(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    d = started(daemon_factory, tmp_path / "home", EXOD_PARALLEL="1", EXOD_QUEUE_DEPTH="1")
    runner = warm(d, qwen2)
    running = d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG)
    read_some(running)
    waiting = d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", "4")
    wait_state(d, runner["id"], lambda r: r["queued"] == 1 and r["active"] == 1)
    refused = d.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "4")
    assert refused.code == 75, refused
    assert refused.stdout == b""
    assert one_line(refused.stderr) and "EXOD_QUEUE_DEPTH=1" in refused.stderr, refused
    running.send_signal(signal.SIGINT)
    assert running.wait(timeout=30) == 130
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert out == expected(qwen2, PROMPT, 4, chat=True).stdout


def test_a_run_that_could_never_fit_is_refused_with_65(exod: Daemon, qwen2: Path) -> None:
    """Its KV cache (prompt + max_tokens) beside the model is over the runner memory cap: refused
    before anything is spawned, and on a loaded runner before it is queued."""
    huge = str(2**31 - 1)  # tokens of 512 bytes: a terabyte of KV cache
    for loaded in (False, True):
        before = exod.events()
        result = exod.exoctl("run", str(qwen2), PROMPT, "--max-tokens", huge)
        assert result.code == 65, result
        assert result.stdout == b""
        assert one_line(result.stderr), result
        for words in ("KV cache", "max_tokens", "EXOD_MAX_RUNNER_MEMORY"):
            assert words in result.stderr, result
        new_kinds = [e["kind"] for e in exod.events()[len(before) :]]
        assert "RunAccepted" not in new_kinds and "RunnerSpawned" not in new_kinds, new_kinds
        if not loaded:
            warm(exod, qwen2)
    assert len(of_kind(exod.events(), "RunnerSpawned")) == 1


def test_a_run_waits_while_its_memory_does_not_fit_beside_another(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    """Two runs, each of which fits beside the model alone but not both together: the second
    waits in the queue, with places free in the batch, until the first ends."""
    cap = 1 << 30
    d = started(
        daemon_factory, tmp_path / "home", EXOD_PARALLEL="4", EXOD_MAX_RUNNER_MEMORY=str(cap)
    )
    runner = warm(d, qwen2)
    assert wait_until(lambda: runner_status(d, runner["id"])["memory_bytes"] > 0, timeout=5)
    time.sleep(1)  # sampled while idle, twice a second: admission knows the model's memory
    model = runner_status(d, runner["id"])["memory_bytes"]
    kv = kv_bytes_per_token(read_config(qwen2))
    # Alone: model + R <= cap. Together: R + (model and more) + R > cap.
    tokens = str(int(0.75 * (cap - model)) // kv)
    first = d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", tokens)
    read_some(first)
    second = d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", tokens)
    wait_state(d, runner["id"], lambda r: r["queued"] == 1)
    time.sleep(1.5)  # memory samples come and go: it keeps waiting
    shown = runner_status(d, runner["id"])
    assert (shown["active"], shown["queued"]) == (1, 1), shown
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=30) == 130
    read_some(second)  # it started once the first left
    wait_state(d, runner["id"], lambda r: r["active"] == 1 and r["queued"] == 0)
    second.send_signal(signal.SIGINT)
    assert second.wait(timeout=30) == 130


def test_a_runner_that_dies_fails_each_of_its_runs_with_its_own_event(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    """SIGKILL to the process that runs MLX (status' mlx_pid, not the shim's pid) while two runs
    are in its batch and one waits: every client exits 75 with one line, and the log has one
    RunnerFailed and a RunFinished for each run."""
    d = started(daemon_factory, tmp_path / "home", EXOD_PARALLEL="2")
    runner = warm(d, qwen2)
    assert runner["mlx_pid"] not in (0, runner["pid"])
    assert is_runner(psutil.Process(runner["mlx_pid"]).cmdline())
    assert psutil.Process(runner["mlx_pid"]).ppid() == runner["pid"]
    clients = [d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG)]
    read_some(clients[0])  # it decodes
    clients.append(d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG))
    wait_state(d, runner["id"], lambda r: r["active"] == 2)
    clients.append(d.exoctl_bg("run", str(qwen2), PROMPT, "--max-tokens", LONG))
    wait_state(d, runner["id"], lambda r: r["active"] == 2 and r["queued"] == 1)
    psutil.Process(runner["mlx_pid"]).send_signal(signal.SIGKILL)
    outcomes = []
    for client in clients:
        client.wait(timeout=60)
        outcomes.append((client.returncode, stderr_of(client)))
    for code, err in outcomes:
        assert code == 75, outcomes
        assert one_line(err) and "was killed by SIGKILL" in err, outcomes
    events = d.events()
    (failed,) = of_kind(events, "RunnerFailed", runner_id=runner["id"])
    assert failed["reason"] == "crashed"
    run_ids = [e["run_id"] for e in of_kind(events, "RunAccepted")[1:]]
    assert len(run_ids) == 3
    for run_id in run_ids:
        assert finished(events, run_id)["reason"] == "crashed"
        assert finished(events, run_id)["seq"] > failed["seq"]


def test_status_shows_the_prompt_cache_and_its_hit_rate(
    daemon_factory: list[Daemon], tmp_path: Path, qwen2: Path
) -> None:
    """Needs the runner's prompt cache: the same prompt again takes its tokens from the cache,
    and the runner's heartbeat (every second) brings that to `exoctl status`."""
    d = started(daemon_factory, tmp_path / "home")
    runner = warm(d, qwen2)
    again = d.exoctl("run", str(qwen2), PROMPT, "--max-tokens", "1")
    assert again.code == 0, again
    assert wait_until(
        lambda: runner_status(d, runner["id"])["prompt_cache_hit_rate"] > 0, timeout=5
    ), runner_status(d, runner["id"])
    shown = runner_status(d, runner["id"])
    assert (shown["active"], shown["queued"]) == (0, 0)
    assert shown["prompt_cache_bytes"] > 0
    assert shown["prompt_cache_hit_rate"] <= 1.0
