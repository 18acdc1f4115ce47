"""The fold: what state each logged fact leads to, and what it does with facts it cannot use."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from exod.eventlog import (
    EMPTY,
    ErrorView,
    ModelView,
    Record,
    RunnerView,
    RunView,
    State,
    alive_runners,
    apply,
    decode,
    encode,
    fold,
    kind_of,
    running_elsewhere,
)
from exod.eventlog.fold import MAX_ENDED_RUNNERS
from exod.proto.exo.v1 import events_pb2 as pb

# An Event as an older exod parses one that a newer exod wrote with a kind it does not know:
# field 99, length-delimited, empty. The oneof stays unset and the bytes are kept as unknown.
FROM_THE_FUTURE = pb.Event.FromString(bytes([0x9A, 0x06, 0x00]))


def records(*events: pb.Event, first_seq: int = 1) -> list[Record]:
    """Records in log order; record n has seq n and ts 100 + n."""
    return [
        Record(seq=s, origin="n1", origin_seq=s, ts=100.0 + s, kind=kind_of(e), event=e)
        for s, e in enumerate(events, start=first_seq)
    ]


def spawned(runner_id: str, model: str = "tiny", pid: int = 4242) -> pb.Event:
    return pb.Event(
        runner_spawned=pb.RunnerSpawned(
            runner_id=runner_id,
            model=model,
            model_path=f"/models/{model}",
            pid=pid,
            start_time=1234.5,
            log_path=f"/logs/{runner_id}.log",
        )
    )


def ready(runner_id: str) -> pb.Event:
    return pb.Event(runner_ready=pb.RunnerReady(runner_id=runner_id, load_s=1.5))


def failed(runner_id: str, reason: str = "load_stall", detail: str = "no progress") -> pb.Event:
    return pb.Event(
        runner_failed=pb.RunnerFailed(runner_id=runner_id, reason=reason, detail=detail, signal=9)
    )


def stopped(runner_id: str, reason: str = "killed") -> pb.Event:
    return pb.Event(runner_stopped=pb.RunnerStopped(runner_id=runner_id, reason=reason))


def accepted(run_id: str, runner_id: str = "r1") -> pb.Event:
    return pb.Event(run_accepted=pb.RunAccepted(run_id=run_id, runner_id=runner_id, model="tiny"))


def finished(run_id: str) -> pb.Event:
    return pb.Event(run_finished=pb.RunFinished(run_id=run_id, stop_reason="stop"))


def model_added(name: str, path: str = "/models/a", content_hash: str = "h1") -> pb.Event:
    return pb.Event(model_added=pb.ModelAdded(name=name, path=path, content_hash=content_hash))


def model_removed(name: str) -> pb.Event:
    return pb.Event(model_removed=pb.ModelRemoved(name=name))


def placed(instance_id: str, model: str = "big") -> pb.Event:
    return pb.Event(instance_placed=pb.InstancePlaced(instance_id=instance_id, model=model))


def instance_ended(instance_id: str) -> pb.Event:
    return pb.Event(instance_ended=pb.InstanceEnded(instance_id=instance_id, reason="killed"))


NODE_STARTED = pb.Event(node_started=pb.NodeStarted(version="0.1.0", pid=1, hostname="h"))
NODE_STOPPED = pb.Event(node_stopped=pb.NodeStopped(reason="signal"))


# ---- kinds ----


def test_kind_is_the_name_of_the_message_set() -> None:
    assert kind_of(failed("r1")) == "RunnerFailed"
    assert kind_of(NODE_STARTED) == "NodeStarted"
    assert kind_of(finished("x")) == "RunFinished"
    assert kind_of(model_removed("m")) == "ModelRemoved"


def test_kind_of_an_event_with_nothing_set_is_empty() -> None:
    assert kind_of(pb.Event()) == ""
    assert kind_of(FROM_THE_FUTURE) == ""


# ---- runners ----


def test_a_spawned_runner_is_spawning_with_its_process_identity() -> None:
    state = fold(records(spawned("r1", model="tiny", pid=77)))
    assert state.runners == {
        "r1": RunnerView(
            id="r1",
            model="tiny",
            model_path="/models/tiny",
            pid=77,
            start_time=1234.5,
            log_path="/logs/r1.log",
            state="spawning",
            spawned_at=101.0,
            ended_at=None,
            last_error=None,
            end_reason="",
        )
    }


def test_a_runner_that_reported_ready_is_ready() -> None:
    state = fold(records(spawned("r1"), ready("r1")))
    assert state.runners["r1"].state == "ready"
    assert state.runners["r1"].ended_at is None


def test_a_failed_runner_keeps_the_reason_detail_and_time_it_ended() -> None:
    state = fold(records(spawned("r1"), ready("r1"), failed("r1", "memory_limit", "9 GiB > 8")))
    runner = state.runners["r1"]
    assert runner.state == "failed"
    assert runner.ended_at == 103.0
    assert runner.last_error == ErrorView(reason="memory_limit", detail="9 GiB > 8")
    assert runner.end_reason == "memory_limit"


@pytest.mark.parametrize("reason", ["killed", "idle", "daemon_stopped", "evicted", "interrupted"])
def test_a_stopped_runner_has_no_error_but_keeps_why_it_stopped(reason: str) -> None:
    state = fold(records(spawned("r1"), ready("r1"), stopped("r1", reason)))
    runner = state.runners["r1"]
    assert (runner.state, runner.ended_at, runner.last_error) == ("stopped", 103.0, None)
    assert runner.end_reason == reason


def test_a_runner_can_stop_before_it_was_ready() -> None:
    state = fold(records(spawned("r1"), stopped("r1")))
    assert state.runners["r1"].state == "stopped"


def test_the_first_end_of_a_runner_is_the_one_that_counts() -> None:
    state = fold(records(spawned("r1"), failed("r1", "crashed"), stopped("r1", "interrupted")))
    runner = state.runners["r1"]
    assert runner.state == "failed"
    assert runner.ended_at == 102.0
    assert runner.last_error == ErrorView("crashed", "no progress")


def test_a_late_ready_does_not_revive_an_ended_runner() -> None:
    state = fold(records(spawned("r1"), failed("r1"), ready("r1")))
    assert state.runners["r1"].state == "failed"


def test_a_runner_spawned_again_under_the_same_id_starts_afresh() -> None:
    state = fold(records(spawned("r1", pid=1), failed("r1"), spawned("r1", pid=2)))
    runner = state.runners["r1"]
    assert (runner.state, runner.pid, runner.ended_at, runner.last_error) == (
        "spawning",
        2,
        None,
        None,
    )


def test_alive_runners_are_the_spawning_and_ready_ones_oldest_first() -> None:
    log = records(spawned("b"), spawned("a"), spawned("c"), spawned("d"))
    state = fold(records(ready("b"), stopped("c"), failed("d"), first_seq=5), fold(log))
    assert [(r.id, r.state) for r in alive_runners(state)] == [("b", "ready"), ("a", "spawning")]


def test_alive_runners_of_the_empty_state_is_empty() -> None:
    assert alive_runners(EMPTY) == []


def test_at_most_the_most_recently_ended_runners_are_kept() -> None:
    n = MAX_ENDED_RUNNERS + 8
    ids = [f"r{i:02d}" for i in range(n)]
    # End them in reverse order of spawning: what counts is when they ended.
    log = [spawned(i) for i in ids] + [stopped(i) for i in reversed(ids)]
    state = fold(records(*log, spawned("alive-1"), spawned("alive-2")))
    ended = {r.id for r in state.runners.values() if r.state == "stopped"}
    assert len(ended) == MAX_ENDED_RUNNERS
    assert ended == set(ids[:MAX_ENDED_RUNNERS])  # the 8 highest ids ended first: forgotten
    assert [r.id for r in alive_runners(state)] == ["alive-1", "alive-2"]


def test_alive_runners_are_never_forgotten_however_many_ended() -> None:
    alive = [spawned(f"a{i}") for i in range(MAX_ENDED_RUNNERS + 5)]
    churn = [e for i in range(MAX_ENDED_RUNNERS + 5) for e in (spawned(f"x{i}"), failed(f"x{i}"))]
    state = fold(records(*alive, *churn))
    assert len(alive_runners(state)) == MAX_ENDED_RUNNERS + 5
    assert len(state.runners) == 2 * MAX_ENDED_RUNNERS + 5


# ---- runs ----


def test_a_run_is_in_flight_from_accepted_until_finished() -> None:
    log = records(spawned("r1"), ready("r1"), accepted("run1"), accepted("run2"), finished("run1"))
    state = fold(log[:4])
    assert state.runs == {
        "run1": RunView(id="run1", runner_id="r1", model="tiny", accepted_at=103.0),
        "run2": RunView(id="run2", runner_id="r1", model="tiny", accepted_at=104.0),
    }
    assert set(fold(log).runs) == {"run2"}


def test_a_run_accepted_for_a_runner_not_in_the_log_is_still_in_flight() -> None:
    # It must be found at the next start to be closed as interrupted.
    state = fold(records(accepted("run1", runner_id="ghost")))
    assert set(state.runs) == {"run1"}


def test_a_run_outlives_the_failure_of_its_runner_until_it_is_finished() -> None:
    state = fold(records(spawned("r1"), accepted("run1"), failed("r1")))
    assert set(state.runs) == {"run1"}


# ---- models and the node ----


def test_an_instance_runs_from_placed_until_ended_and_an_end_of_another_changes_nothing() -> None:
    state = fold(records(placed("i-1", "a"), placed("i-2", "b"), instance_ended("i-1")))
    assert dict(state.instances) == {"i-2": "b"}
    assert fold(records(instance_ended("i-9")), state).instances == state.instances


def test_an_instance_another_member_placed_is_not_this_nodes_to_close() -> None:
    record = Record(
        seq=1, origin="n2", origin_seq=1, ts=1.0, kind="InstancePlaced", event=placed("i-1")
    )
    assert dict(apply(EMPTY, record, own="n1").instances) == {}


def test_what_model_a_members_live_runners_run_is_known_by_its_content_hash() -> None:
    def theirs(seq: int, event: pb.Event) -> Record:
        return Record(
            seq=seq, origin="n2", origin_seq=seq, ts=1.0, kind=kind_of(event), event=event
        )

    spawned_there = spawned("r1")
    spawned_there.runner_spawned.content_hash = "h-big"
    before = spawned("r0")  # an exod that logged no content hash
    state = fold([theirs(1, before), theirs(2, spawned_there)], own="n1")
    assert running_elsewhere(state, "h-big") == ["n2"]
    assert running_elsewhere(state, "h-other") == []
    assert decode(encode(state)) == state
    state = apply(state, theirs(3, stopped("r1")), own="n1")
    assert running_elsewhere(state, "h-big") == []
    # This node's own runners are not "elsewhere".
    assert running_elsewhere(fold(records(spawned_there), own="n1"), "h-big") == []


def test_models_are_added_replaced_and_removed_by_name() -> None:
    log = records(
        model_added("a", "/m/a", "h1"),
        model_added("b", "/m/b", "h2"),
        model_added("a", "/m/a2", "h3"),
        model_removed("b"),
    )
    assert fold(log).models == {"a": ModelView(name="a", path="/m/a2", content_hash="h3")}


def test_each_node_start_is_counted_and_a_stop_changes_nothing_else() -> None:
    state = fold(records(NODE_STARTED, NODE_STOPPED, NODE_STARTED, NODE_STOPPED))
    assert state == replace(EMPTY, starts=2, last_seq=4)


# ---- what the fold skips ----


@pytest.mark.parametrize(
    "event",
    [
        ready("ghost"),
        failed("ghost"),
        stopped("ghost"),
        finished("no-such-run"),
        model_removed("no-such-model"),
    ],
    ids=kind_of,
)
def test_facts_about_unknown_ids_change_nothing_but_last_seq(event: pb.Event) -> None:
    before = fold(records(spawned("r1"), accepted("run1"), model_added("a")))
    (record,) = records(event, first_seq=4)
    assert apply(before, record) == replace(before, last_seq=4)


@pytest.mark.parametrize(
    ("kind", "event"),
    [
        ("InstancePlaced", FROM_THE_FUTURE),  # a kind this exod's schema does not have
        ("RunnerSpawned", pb.Event()),  # a kind whose payload has nothing set
        ("RunnerSpawned", failed("r1")),  # a kind that disagrees with its payload
    ],
    ids=["unknown kind", "unset payload", "mismatched payload"],
)
def test_records_the_fold_cannot_use_are_skipped(kind: str, event: pb.Event) -> None:
    before = fold(records(spawned("r1")))
    record = Record(seq=2, origin="n1", origin_seq=2, ts=5.0, kind=kind, event=event)
    assert apply(before, record) == replace(before, last_seq=2)


def test_records_after_a_skipped_one_are_folded() -> None:
    log = records(spawned("r1"), spawned("r2"))
    future = Record(seq=2, origin="n1", origin_seq=2, ts=1.0, kind="X", event=FROM_THE_FUTURE)
    state = fold([log[0], future, replace(log[1], seq=3)])
    assert set(state.runners) == {"r1", "r2"}
    assert state.last_seq == 3


# ---- purity ----


def test_apply_leaves_its_input_unchanged() -> None:
    before = fold(records(spawned("r1"), accepted("run1"), model_added("a")))
    copy = replace(before)
    fold(records(failed("r1"), finished("run1"), model_removed("a"), first_seq=4), before)
    assert before == copy
    assert before.runners["r1"].state == "spawning"


def test_the_state_cannot_be_changed_from_outside() -> None:
    state = fold(records(spawned("r1")))
    with pytest.raises(TypeError):
        state.runners["r2"] = state.runners["r1"]  # type: ignore[index]  # the point of the test


def test_fold_is_apply_record_by_record() -> None:
    log = records(NODE_STARTED, spawned("r1"), ready("r1"), accepted("run1"), finished("run1"))
    state = EMPTY
    for record in log:
        state = apply(state, record)
    assert fold(log) == state
    assert fold(log[2:], fold(log[:2])) == state


# ---- snapshots ----


def busy_state() -> State:
    return fold(
        records(
            NODE_STARTED,
            spawned("alive"),
            spawned("ready"),
            ready("ready"),
            spawned("failed"),
            failed("failed", "decode_stall", "no token for 30 s"),
            spawned("stopped"),
            stopped("stopped", "idle"),
            accepted("run1", "ready"),
            model_added("a", "/m/ä", "h"),
            placed("i-1", "big"),
        )
    )


def test_encode_then_decode_gives_back_the_same_state() -> None:
    state = busy_state()
    # Every optional field appears both set and unset.
    assert {r.ended_at is None for r in state.runners.values()} == {True, False}
    assert {r.last_error is None for r in state.runners.values()} == {True, False}
    assert decode(encode(state)) == state


def test_the_empty_state_survives_encoding() -> None:
    assert decode(encode(EMPTY)) == EMPTY


def test_times_keep_every_bit_through_encoding() -> None:
    (record,) = records(spawned("r1"))
    state = apply(EMPTY, replace(record, ts=1_700_000_000.123456789))
    assert decode(encode(state)).runners["r1"].spawned_at == 1_700_000_000.123456789


def test_a_decoded_state_cannot_be_changed_from_outside() -> None:
    state = decode(encode(busy_state()))
    with pytest.raises(TypeError):
        state.models["b"] = state.models["a"]  # type: ignore[index]  # the point of the test


def test_a_decoded_state_folds_on_like_the_original() -> None:
    state = busy_state()
    more = records(failed("alive"), finished("run1"), first_seq=state.last_seq + 1)
    assert fold(more, decode(encode(state))) == fold(more, state)


def _runner_json(**change: object) -> bytes:
    runner = {
        "id": "r1",
        "model": "m",
        "model_path": "/m",
        "pid": 1,
        "start_time": 1.0,
        "log_path": "/l",
        "state": "ready",
        "spawned_at": 1.0,
        "ended_at": None,
        "last_error": None,
        "end_reason": "",
    }
    runner.update(change)
    doc = {"last_seq": 1, "starts": 0, "runners": [runner], "runs": [], "models": []}
    return json.dumps(doc).encode()


def test_the_runner_document_used_below_is_valid() -> None:
    assert decode(_runner_json()).runners["r1"].state == "ready"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[]",
        b"{}",
        b'{"last_seq": 1, "starts": 0, "runners": [], "runs": []}',
        _runner_json(state="exploded"),
        _runner_json(pid="1"),
        _runner_json(pid=True),
        _runner_json(spawned_at="yesterday"),
        _runner_json(last_error={"reason": "crashed"}),
        _runner_json(last_error="crashed"),
        _runner_json(end_reason=None),
    ],
)
def test_decoding_anything_but_an_encoded_state_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a state"):
        decode(data)
