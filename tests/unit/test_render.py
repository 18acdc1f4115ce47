"""Rendering is pure: each output format of exoctl, checked from proto messages alone."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from exoctl import render
from exoctl.failures import Failure
from exoctl.run import RunOutput
from exoctl.terminal import StatusLine
from exod import API_VERSION
from exod.errors import Exit
from exod.eventlog.fold import MAX_ENDED_RUNNERS
from exod.proto.exo.v1 import control_pb2, events_pb2


def _status() -> control_pb2.StatusReply:
    return control_pb2.StatusReply(
        version="0.1.0",
        api_version=API_VERSION,
        node_id="n-7f3a",
        node_name="studio",
        home="/home/u/.local/state/exod",
        pid=4242,
        uptime_s=7384.5,
        event_count=17,
        runners=[
            control_pb2.RunnerInfo(
                id="r-1",
                model="demo",
                state="ready",
                pid=999,
                memory_bytes=3 * 1024**3 // 2,
                model_path="/m/demo",
                queued=2,
                idle_s=1.5,
                mlx_pid=1001,
                active=3,
                prompt_cache_bytes=48 * 1024**2,
                prompt_cache_hit_rate=0.427,
            ),
            control_pb2.RunnerInfo(
                id="r-22",
                model="qwen",
                state="failed",
                last_error=control_pb2.ErrorInfo(
                    reason="load_stall", detail="no progress\nfor 30 s"
                ),
                end_reason="load_stall",
                ended_at=Timestamp(seconds=int(NOW) - 192),
            ),
            control_pb2.RunnerInfo(
                id="r-3",
                model="demo",
                state="stopped",
                end_reason="idle",
                ended_at=Timestamp(seconds=int(NOW) - 7384),
            ),
        ],
    )


# The moment the status above is shown at.
NOW = 1795756484.0


def _record(event: events_pb2.Event, kind: str = "") -> control_pb2.EventRecord:
    return control_pb2.EventRecord(
        seq=12,
        origin="n-7f3a",
        origin_seq=9,
        ts=Timestamp(seconds=1795756484, nanos=123456789),
        kind=kind,
        event=event,
    )


def _failed() -> control_pb2.EventRecord:
    payload = events_pb2.RunnerFailed(runner_id="r-1", reason="load_stall", detail="no progress")
    return _record(events_pb2.Event(runner_failed=payload), kind="RunnerFailed")


# --- units --------------------------------------------------------------------------------------


def test_human_bytes_uses_binary_units() -> None:
    assert render.human_bytes(0) == "-"
    assert render.human_bytes(512) == "512 B"
    assert render.human_bytes(1024) == "1.0 KiB"
    assert render.human_bytes(3 * 1024**3 // 2) == "1.5 GiB"
    assert render.human_bytes(5 * 1024**5) == "5120.0 TiB"


def test_human_duration_shows_two_units() -> None:
    assert render.human_duration(0) == "0s"
    assert render.human_duration(45.9) == "45s"
    assert render.human_duration(192) == "3m12s"
    assert render.human_duration(7384.5) == "2h03m"
    assert render.human_duration(4 * 86400 + 7 * 3600) == "4d07h"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (1795756484.123456, "2026-11-27T05:14:44.123Z"),
        (1795756484.9996, "2026-11-27T05:14:45.000Z"),  # rounds up into the next second
        (0, "1970-01-01T00:00:00.000Z"),
    ],
)
def test_utc_time_is_utc_to_the_millisecond(seconds: float, text: str) -> None:
    assert render.utc_time(seconds) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2.0011227029999645, "2.001"),
        (0.0282660820001, "0.02827"),
        (797.5, "797.5"),
        (12345.6, "12346"),
        (1.796e9, "1796000000"),
        (0.5, "0.5"),
        (0.0, "0"),
        (-3.25, "-3.25"),
        (float("inf"), "inf"),
    ],
)
def test_plain_number_has_four_significant_digits_and_no_exponent(value: float, text: str) -> None:
    assert render.plain_number(value) == text


def test_rfc3339_is_utc_with_microseconds() -> None:
    assert render.rfc3339(Timestamp(seconds=1795756484, nanos=123456789)) == (
        "2026-11-27T05:14:44.123456Z"
    )
    assert render.rfc3339(Timestamp()) == "1970-01-01T00:00:00.000000Z"


def test_table_aligns_columns_without_trailing_blanks() -> None:
    lines = render.table(["A", "LONGER"], [["xxx", "y"], ["z", ""]])
    assert lines == ["A    LONGER", "xxx  y", "z"]


def test_cut_keeps_one_line_and_marks_the_cut() -> None:
    assert render.cut("a\nb") == "a b"
    assert render.cut("x" * 100, 10) == "x" * 9 + "…"


# --- status -------------------------------------------------------------------------------------


def test_status_lines_show_the_live_runners_and_count_the_ended_ones() -> None:
    assert render.status_lines(_status(), show_all=False, now=NOW) == [
        "exod 0.1.0 (api 1)  node n-7f3a (studio)  pid 4242  "
        "up 2h03m  home /home/u/.local/state/exod",
        "ID   MODEL  STATE  PID  MLX_PID  ACTIVE  QUEUED  MEMORY   CACHE     HIT",
        "r-1  demo   ready  999  1001     3       2       1.5 GiB  48.0 MiB  43%",
        "2 ended runners not shown; `exoctl status --all` shows why they ended",
    ]


def test_status_lines_with_all_say_when_and_why_each_runner_ended() -> None:
    assert render.status_lines(_status(), show_all=True, now=NOW)[1:] == [
        "ID    MODEL  STATE    PID  MLX_PID  ACTIVE  QUEUED  MEMORY   CACHE     HIT  ENDED      "
        "WHY",
        "r-1   demo   ready    999  1001     3       2       1.5 GiB  48.0 MiB  43%  -          -",
        "r-22  qwen   failed   -    -        -       -       -        -         -    3m12s ago  "
        "load_stall: no progress for 30 s",
        "r-3   demo   stopped  -    -        -       -       -        -         -    2h03m ago  "
        "idle: unused for EXOD_IDLE_TTL",
    ]


def test_an_ended_runner_shows_no_pid_even_if_exod_sent_one() -> None:
    ended = control_pb2.RunnerInfo(
        id="r-9", state="stopped", pid=77, mlx_pid=78, active=1, prompt_cache_bytes=5
    )
    reply = control_pb2.StatusReply(runners=[ended])
    assert render.status_lines(reply, show_all=True, now=NOW)[-1].split() == [
        "r-9",
        "stopped",
        *["-"] * 9,
    ]


def test_a_live_runner_without_its_mlx_pid_yet_shows_a_dash() -> None:
    loading = control_pb2.RunnerInfo(id="r-8", model="m", state="loading", pid=77)
    reply = control_pb2.StatusReply(runners=[loading])
    assert render.status_lines(reply, show_all=False, now=NOW)[1:] == [
        "ID   MODEL  STATE    PID  MLX_PID  ACTIVE  QUEUED  MEMORY  CACHE  HIT",
        "r-8  m      loading  77   -        0       0       -       -      0%",
    ]


def test_the_docs_show_the_status_columns() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    headers = [line.split() for line in docs.read_text().splitlines() if line.startswith("ID ")]
    assert list(render.STATUS_COLUMNS) in headers
    assert [*render.STATUS_COLUMNS, "ENDED", "WHY"] in headers


@pytest.mark.parametrize(
    ("state", "reason", "detail", "why"),
    [
        ("stopped", "idle", "", "idle: unused for EXOD_IDLE_TTL"),
        ("stopped", "killed", "", "killed: by `exoctl kill`"),
        ("stopped", "evicted", "", "evicted: to make room for another model"),
        ("stopped", "daemon_stopped", "", "daemon_stopped: exod stopped"),
        ("stopped", "something_new", "", "something_new"),  # from a newer exod
        ("stopped", "", "", ""),  # its end could not be logged
        ("failed", "crashed", "signal 9", "crashed: signal 9"),
        ("failed", "memory_limit", "", "memory_limit: memory limit hit"),
        ("ready", "", "", ""),
    ],
)
def test_why_a_runner_ended(state: str, reason: str, detail: str, why: str) -> None:
    runner = control_pb2.RunnerInfo(id="r", state=state, end_reason=reason)
    if state == "failed":
        runner.last_error.CopyFrom(control_pb2.ErrorInfo(reason=reason, detail=detail))
    assert render.why_ended(runner) == why


def test_status_lines_without_runners() -> None:
    reply = _status()
    del reply.runners[:]
    assert render.status_lines(reply, show_all=False, now=NOW)[1:] == ["no runners"]
    assert render.status_lines(reply, show_all=True, now=NOW)[1:] == ["no runners"]


def test_status_lines_when_every_runner_ended() -> None:
    reply = _status()
    del reply.runners[0]
    del reply.runners[1]
    assert render.status_lines(reply, show_all=False, now=NOW)[1:] == [
        "no runners running",
        "1 ended runner not shown; `exoctl status --all` shows why it ended",
    ]


def test_the_docs_say_how_many_ended_runners_exod_keeps() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    text = " ".join(docs.read_text().split())  # whatever the line breaks
    assert f"**{MAX_ENDED_RUNNERS} most recently ended runners**" in text


def test_status_json_has_the_documented_shape_and_every_runner() -> None:
    obj = render.status_json(_status())
    assert json.loads(render.json_line(obj)) == obj
    assert set(obj) == {
        "version",
        "api_version",
        "node_id",
        "node_name",
        "home",
        "pid",
        "uptime_s",
        "event_count",
        "warnings",
        "cluster",
        "nodes",
        "instances",
        "runners",
    }
    assert obj["cluster"] is None  # outside a cluster
    assert obj["nodes"] == []
    ready, failed, stopped = obj["runners"]
    assert ready == {
        "id": "r-1",
        "model": "demo",
        "state": "ready",
        "pid": 999,
        "memory_bytes": 3 * 1024**3 // 2,
        "last_error": None,
        "mlx_pid": 1001,
        "active": 3,
        "queued": 2,
        "prompt_cache_bytes": 48 * 1024**2,
        "prompt_cache_hit_rate": 0.427,
        "idle_s": 1.5,
        "model_path": "/m/demo",
        "end_reason": None,
        "ended_at": None,
    }
    assert failed["last_error"] == {"reason": "load_stall", "detail": "no progress\nfor 30 s"}
    assert (failed["end_reason"], failed["ended_at"]) == (
        "load_stall",
        "2026-11-27T05:11:32.000000Z",
    )
    assert (stopped["state"], stopped["pid"], stopped["last_error"], stopped["end_reason"]) == (
        "stopped",
        0,
        None,
        "idle",
    )


def test_status_shows_the_cluster_of_a_member() -> None:
    reply = _status()
    reply.cluster.id = "c-0123456789ab"
    reply.cluster.ca_fingerprint = "ab" * 32
    assert render.status_json(reply)["cluster"] == {
        "id": "c-0123456789ab",
        "ca_fingerprint": "ab" * 32,
    }
    lines = render.status_lines(reply, show_all=False, now=0.0)
    assert f"cluster c-0123456789ab  CA {'ab' * 32}" in lines


def test_status_lists_the_members_of_a_cluster() -> None:
    reply = _status()
    reply.cluster.id = "c-0123456789ab"
    me = reply.nodes.add(id="n-a", name="desk", state="self", runners=1, addresses=["10.0.0.2"])
    me.memory_free_bytes, me.memory_total_bytes = 8 * 1024**3, 16 * 1024**3
    peer = reply.nodes.add(id="n-b", name="laptop", state="alive", addresses=["10.0.0.3"])
    peer.memory_free_bytes, peer.memory_total_bytes = 2 * 1024**3, 8 * 1024**3
    peer.last_seen.FromSeconds(95)
    reply.nodes.add(id="n-c", name="old", state="refused", reason="duplicate_id")
    lines = render.status_lines(reply, show_all=False, now=100.0)
    at = lines.index("NODES")
    assert lines[at + 1].split() == list(render.NODE_COLUMNS)
    assert lines[at + 2].split() == [
        "n-a",
        "desk",
        "self",
        "10.0.0.2",
        "8.0",
        "GiB",
        "16.0",
        "GiB",
        "1",
        "-",
    ]
    assert lines[at + 3].split()[:3] == ["n-b", "laptop", "alive"]
    assert lines[at + 3].endswith(" ago")
    assert "refused (duplicate_id)" in lines[at + 4]
    nodes = render.status_json(reply)["nodes"]
    assert nodes[1] == {
        "id": "n-b",
        "name": "laptop",
        "addresses": ["10.0.0.3"],
        "state": "alive",
        "reason": None,
        "memory_free_bytes": 2 * 1024**3,
        "memory_total_bytes": 8 * 1024**3,
        "runners": 0,
        "last_seen": "1970-01-01T00:01:35.000000Z",
    }
    assert nodes[2]["reason"] == "duplicate_id" and nodes[2]["last_seen"] is None


def test_api_version_warning_only_on_a_mismatch() -> None:
    reply = _status()
    assert render.api_version_warning(reply) is None
    reply.api_version = "2"
    warning = render.api_version_warning(reply)
    assert warning is not None
    assert "2" in warning
    assert API_VERSION in warning


# --- events -------------------------------------------------------------------------------------


def test_event_json_flattens_the_payload_beside_the_envelope() -> None:
    obj = render.event_json(_failed())
    assert obj == {
        "seq": 12,
        "origin": "n-7f3a",
        "origin_seq": 9,
        "ts": "2026-11-27T05:14:44.123456Z",
        "kind": "RunnerFailed",
        "runner_id": "r-1",
        "reason": "load_stall",
        "detail": "no progress",
        "exit_status": 0,  # fields at their default are present in --json
        "signal": 0,
    }
    assert list(obj)[:5] == ["seq", "origin", "origin_seq", "ts", "kind"]


def test_event_kind_comes_from_the_payload_not_the_stored_string() -> None:
    event = events_pb2.Event(runner_ready=events_pb2.RunnerReady(runner_id="r-1", load_s=2.5))
    obj = render.event_json(_record(event, kind="stale"))
    assert obj["kind"] == "RunnerReady"
    assert obj["load_s"] == 2.5


def test_event_of_an_unknown_kind_keeps_its_record_kind() -> None:
    # A newer daemon's kind parses as an Event with no field set.
    obj = render.event_json(_record(events_pb2.Event(), kind="InstancePlaced"))
    assert obj["kind"] == "InstancePlaced"
    assert set(obj) == {"seq", "origin", "origin_seq", "ts", "kind"}
    assert render.event_line(_record(events_pb2.Event(), kind="InstancePlaced")).endswith(
        "InstancePlaced"
    )


def test_event_line_quotes_values_with_spaces_and_omits_defaults() -> None:
    line = render.event_line(_failed())
    assert line == (
        "12  2026-11-27T05:14:44.123Z  RunnerFailed  runner_id=r-1 reason=load_stall "
        'detail="no progress"'
    )


def test_event_line_writes_numbers_and_empty_strings_plainly() -> None:
    event = events_pb2.Event(
        run_finished=events_pb2.RunFinished(
            run_id="u-1", stop_reason="length", generation_tokens=40, ttft_s=0.0282660820001
        )
    )
    assert render.event_line(_record(event)).endswith(
        "RunFinished  run_id=u-1 stop_reason=length generation_tokens=40 ttft_s=0.02827"
    )


def _spawned() -> control_pb2.EventRecord:
    spawned = events_pb2.RunnerSpawned(
        runner_id="r-1", model="demo", pid=4566, start_time=1795756483.5678
    )
    return _record(events_pb2.Event(runner_spawned=spawned))


def test_event_line_prints_a_time_field_as_a_time() -> None:
    assert render.event_line(_spawned()) == (
        "12  2026-11-27T05:14:44.123Z  RunnerSpawned  runner_id=r-1 model=demo pid=4566 "
        "start_time=2026-11-27T05:14:43.568Z"
    )


def test_event_json_keeps_a_time_field_a_plain_number() -> None:
    line = render.json_line(render.event_json(_spawned()))
    assert '"start_time":1795756483.5678,' in line
    assert json.loads(line)["start_time"] == 1795756483.5678


def test_only_times_are_time_fields() -> None:
    assert render.is_time_field("start_time")
    assert render.is_time_field("ended_at")
    assert not render.is_time_field("load_s")
    assert not render.is_time_field("tokens_per_s")


# --- run ----------------------------------------------------------------------------------------


def test_run_json_lines() -> None:
    assert render.json_line(render.token_json('héllo "x"\n')) == (
        '{"type":"token","text":"héllo \\"x\\"\\n"}'
    )
    done = control_pb2.RunDone(
        prompt_tokens=5,
        generation_tokens=7,
        ttft_s=0.5,
        tokens_per_s=30.0,
        stop_reason="stop",
        cached_tokens=3,
    )
    assert json.loads(render.json_line(render.done_json(done))) == {
        "type": "done",
        "prompt_tokens": 5,
        "generation_tokens": 7,
        "ttft_s": 0.5,
        "tokens_per_s": 30.0,
        "stop_reason": "stop",
        "cached_tokens": 3,
        "instance": None,
    }
    assert render.error_json("crashed", "runner died", 75) == {
        "type": "error",
        "reason": "crashed",
        "message": "runner died",
        "exit_code": 75,
    }


def test_progress_and_started_text() -> None:
    progress = control_pb2.Progress
    assert render.progress_text(progress(phase="loading weights", current=3, total=24)) == (
        "loading weights 3/24"
    )
    assert render.progress_text(progress(phase="tokenizing", current=2)) == "tokenizing 2"
    assert render.progress_text(progress(phase="warming up")) == "warming up"
    sending = progress(phase="sending weights to n-2", current=12_000_000, total=48_500_000)
    sending.unit = "bytes"
    assert render.progress_text(sending) == "sending weights to n-2 12.0/48.5 MB (24%)"
    queued = control_pb2.RunStarted(run_id="u", runner_id="r-1", queue_position=2)
    assert render.started_text(queued) == "queued for runner r-1 (position 2)"


def _replies(*texts: str, done: bool = True) -> list[control_pb2.RunReply]:
    replies = [control_pb2.RunReply(started=control_pb2.RunStarted(run_id="u", runner_id="r"))]
    replies.append(control_pb2.RunReply(progress=control_pb2.Progress(phase="loading", total=2)))
    replies += [control_pb2.RunReply(tokens=control_pb2.TokenChunk(text=t)) for t in texts]
    if done:
        replies.append(control_pb2.RunReply(done=control_pb2.RunDone(stop_reason="length")))
    return replies


def _output(as_json: bool) -> tuple[RunOutput, io.BytesIO, io.StringIO]:
    stdout, stderr = io.BytesIO(), io.StringIO()  # StringIO is no terminal: no progress
    return RunOutput(stdout, StatusLine(stderr), as_json=as_json), stdout, stderr


def test_run_output_plain_is_the_text_and_one_newline() -> None:
    out, stdout, stderr = _output(as_json=False)
    finished = [out.reply(r) for r in _replies("Hé", "llo", "")]
    assert finished[-1] is True
    assert not any(finished[:-1])
    assert stdout.getvalue() == "Héllo\n".encode()
    assert stderr.getvalue() == ""


def test_run_output_json_is_one_object_per_line() -> None:
    out, stdout, _ = _output(as_json=True)
    for reply in _replies("a", "b"):
        out.reply(reply)
    lines = [json.loads(line) for line in stdout.getvalue().decode().splitlines()]
    assert [line["type"] for line in lines] == ["token", "token", "done"]
    assert lines[-1]["stop_reason"] == "length"


def test_run_output_on_failure_ends_the_line_or_writes_an_error_object() -> None:
    failure = Failure(Exit.TEMPFAIL, "runner died. retry later", reason="crashed")
    out, stdout, _ = _output(as_json=False)
    for reply in _replies("partial", done=False):
        out.reply(reply)
    out.failed(failure)
    assert stdout.getvalue() == b"partial\n"

    out, stdout, _ = _output(as_json=True)
    out.failed(failure)
    assert json.loads(stdout.getvalue()) == {
        "type": "error",
        "reason": "crashed",
        "message": "runner died. retry later",
        "exit_code": 75,
    }


def test_status_line_draws_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    line = StatusLine(tty)
    line.show("loading 1/2")
    line.clear()
    line.clear()  # a second clear writes nothing
    assert tty.getvalue() == "\r\x1b[Kloading 1/2\r\x1b[K"


# --- models and kill ----------------------------------------------------------------------------


def test_models_table_and_json() -> None:
    reply = control_pb2.ModelsReply(
        models=[control_pb2.ModelInfo(name="demo", path="/m/demo", content_hash="0123456789abcdef")]
    )
    assert render.models_lines(reply) == ["NAME  PATH     HASH", "demo  /m/demo  0123456789ab"]
    assert render.models_json(reply) == {
        "models": [{"name": "demo", "path": "/m/demo", "content_hash": "0123456789abcdef"}]
    }
    assert render.models_lines(control_pb2.ModelsReply()) == ["no models registered"]


def test_kill_json() -> None:
    assert render.kill_json(control_pb2.KillReply(killed=["r-1", "r-2"])) == {
        "killed": ["r-1", "r-2"]
    }


def test_status_shows_warnings_in_both_forms() -> None:
    reply = control_pb2.StatusReply(
        version="1", warnings=[control_pb2.Warning(code="local_network_denied", message="fix it")]
    )
    assert "warning: local_network_denied: fix it" in render.status_lines(
        reply, show_all=False, now=NOW
    )
    assert render.status_json(reply)["warnings"] == [
        {"code": "local_network_denied", "message": "fix it"}
    ]
