"""Pure rendering: proto messages in, table lines and JSON-ready dicts out.

Nothing here writes or reads anything, so every output format is tested without a daemon. The
plain forms are for people; the --json forms are the stable contract for scripts (docs/cli.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from exod import API_VERSION
from exod.errors import REASONS
from exod.proto.exo.v1 import control_pb2

# Columns are cut here so that one long error does not push a table off the screen; --json has
# the whole text.
MAX_CELL = 60


def json_line(obj: dict[str, Any]) -> str:
    """One compact JSON object, no newline; non-ASCII text stays readable."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, without trailing blanks."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]


def cut(text: str, limit: int = MAX_CELL) -> str:
    """`text` on one line, at most `limit` characters, an ellipsis marking a cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def human_bytes(n: int) -> str:
    """Binary units as `top` and `ps` users read them: 512 B, 3.4 MiB, 12.0 GiB; "-" for 0."""
    if n <= 0:
        return "-"
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def human_duration(seconds: float) -> str:
    """The two largest units: 45s, 3m12s, 2h03m, 4d07h."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def rfc3339(ts: Timestamp) -> str:
    """UTC with microseconds and a Z, e.g. 2026-11-27T03:14:44.123456Z."""
    moment = datetime.fromtimestamp(ts.seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ts.nanos // 1000:06d}Z"


def utc_time(seconds: float) -> str:
    """A Unix time as people read it: UTC to the millisecond, e.g. 2026-11-27T03:14:44.123Z."""
    whole, millis = divmod(round(seconds * 1000), 1000)
    moment = datetime.fromtimestamp(whole, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


def plain_number(value: float) -> str:
    """Four significant digits and never an exponent: 2.001, 0.02827, 797.5, 12346."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# --- status -------------------------------------------------------------------------------------


def api_version_warning(reply: control_pb2.StatusReply) -> str | None:
    """A warning when exod speaks another API version than this exoctl; None when they agree."""
    if reply.api_version == API_VERSION:
        return None
    return (
        f"warning: exod speaks API version {reply.api_version or '?'}, this exoctl speaks "
        f"{API_VERSION}; some commands may fail until both are the same release"
    )


def _last_error(runner: control_pb2.RunnerInfo) -> dict[str, str] | None:
    if not runner.HasField("last_error") or not runner.last_error.reason:
        return None
    return {"reason": runner.last_error.reason, "detail": runner.last_error.detail}


ENDED_STATES = frozenset({"stopped", "failed"})

# What each reason for stopping a runner means, for people; failures carry their own detail.
_STOPPED_BECAUSE = {
    "idle": "unused for EXOD_IDLE_TTL",
    "killed": "by `exoctl kill`",
    "evicted": "to make room for another model",
    "daemon_stopped": "exod stopped",
}


def has_ended(runner: control_pb2.RunnerInfo) -> bool:
    return runner.state in ENDED_STATES


def why_ended(runner: control_pb2.RunnerInfo) -> str:
    """`reason: what it means` for an ended runner; "" for a live one, or an end not logged."""
    if not has_ended(runner):
        return ""
    error = _last_error(runner)
    reason = error["reason"] if error else runner.end_reason
    if not reason:
        return ""
    known = REASONS.get(reason)
    meaning = (
        (error["detail"] if error else "")
        or _STOPPED_BECAUSE.get(reason, "")
        or (known.summary if known else "")
    )
    return f"{reason}: {meaning}" if meaning else reason


def percent(fraction: float) -> str:
    """A share as a whole percentage: 0.427 -> 43%."""
    return f"{round(fraction * 100)}%"


# The columns of `exoctl status`, in order (docs/cli.md); --all adds ENDED and WHY.
STATUS_COLUMNS = (
    "ID",
    "MODEL",
    "STATE",
    "PID",
    "MLX_PID",
    "ACTIVE",
    "QUEUED",
    "MEMORY",
    "CACHE",
    "HIT",
)


def _runner_row(r: control_pb2.RunnerInfo, now: float, *, with_end: bool) -> list[str]:
    live = not has_ended(r)
    # An ended runner's pids are nobody's, and its work and cache are gone with it.
    row = [
        r.id,
        cut(r.model, 40),
        r.state,
        str(r.pid) if r.pid and live else "-",
        str(r.mlx_pid) if r.mlx_pid and live else "-",
        str(r.active) if live else "-",
        str(r.queued) if live else "-",
        human_bytes(r.memory_bytes),
        human_bytes(r.prompt_cache_bytes) if live else "-",
        percent(r.prompt_cache_hit_rate) if live else "-",
    ]
    if with_end:
        ended = r.ended_at.ToNanoseconds() / 1e9 if r.HasField("ended_at") else None
        row.append("-" if ended is None else f"{human_duration(now - ended)} ago")
        row.append(cut(why_ended(r)) or "-")
    return row


def status_lines(reply: control_pb2.StatusReply, *, show_all: bool, now: float) -> list[str]:
    """A header about the daemon, then one row per live runner; with `show_all` the ended ones
    too, with when and why they ended. `now` (Unix time) dates the ends."""
    header = (
        f"exod {reply.version} (api {reply.api_version})  "
        f"node {reply.node_id} ({reply.node_name})  pid {reply.pid}  "
        f"up {human_duration(reply.uptime_s)}  home {reply.home}"
    )
    lines = [header, *(f"warning: {w.code}: {w.message}" for w in reply.warnings)]
    if reply.HasField("cluster"):
        lines.append(f"cluster {reply.cluster.id}  CA {reply.cluster.ca_fingerprint}")
        lines += node_lines(reply.nodes, now)
        lines += instance_lines(reply.instances)
    shown = [r for r in reply.runners if show_all or not has_ended(r)]
    hidden = len(reply.runners) - len(shown)
    if shown:
        headers = [*STATUS_COLUMNS, *(["ENDED", "WHY"] if show_all else [])]
        lines += table(headers, [_runner_row(r, now, with_end=show_all) for r in shown])
    else:
        lines.append("no runners running" if hidden else "no runners")
    if hidden:
        runners, they = ("runner", "it") if hidden == 1 else ("runners", "they")
        lines.append(
            f"{hidden} ended {runners} not shown; `exoctl status --all` shows why {they} ended"
        )
    return lines


def status_json(reply: control_pb2.StatusReply) -> dict[str, Any]:
    """Every runner that exod reports, live and ended alike: scripts tell them apart by state."""
    return {
        "version": reply.version,
        "api_version": reply.api_version,
        "node_id": reply.node_id,
        "node_name": reply.node_name,
        "home": reply.home,
        "pid": reply.pid,
        "uptime_s": reply.uptime_s,
        "event_count": reply.event_count,
        "warnings": [{"code": w.code, "message": w.message} for w in reply.warnings],
        "cluster": cluster_json(reply.cluster) if reply.HasField("cluster") else None,
        "nodes": [node_json(n) for n in reply.nodes],
        "instances": [instance_json(i) for i in reply.instances],
        "runners": [
            {
                "id": r.id,
                "model": r.model,
                "state": r.state,
                "pid": r.pid,
                "memory_bytes": r.memory_bytes,
                "last_error": _last_error(r),
                "mlx_pid": r.mlx_pid,
                "active": r.active,
                "queued": r.queued,
                "prompt_cache_bytes": r.prompt_cache_bytes,
                "prompt_cache_hit_rate": r.prompt_cache_hit_rate,
                "idle_s": r.idle_s,
                "model_path": r.model_path,
                "end_reason": r.end_reason or None,
                "ended_at": rfc3339(r.ended_at) if r.HasField("ended_at") else None,
            }
            for r in reply.runners
        ],
    }


def instance_json(i: control_pb2.InstanceInfo) -> dict[str, Any]:
    return {
        "id": i.id,
        "model": i.model,
        "state": i.state,
        "coordinator": i.coordinator,
        "ranks": [
            {
                "rank": r.rank,
                "node": r.node,
                "runner": r.runner or None,
                "layers": [r.first_layer, r.last_layer],
                "state": r.state,
                "weights_sent": r.weights_sent,
                "weights_total": r.weights_total,
            }
            for r in i.ranks
        ],
    }


# The columns of the INSTANCES section of `exoctl status`: one row per rank.
INSTANCE_COLUMNS = ("INSTANCE", "MODEL", "RANK", "NODE", "LAYERS", "RUNNER", "STATE")


def instance_lines(instances: Sequence[control_pb2.InstanceInfo]) -> list[str]:
    """The split models this node coordinates, a row per rank (none: no section)."""
    rows = [
        [
            i.id,
            cut(i.model),
            str(r.rank),
            r.node,
            f"{r.first_layer}-{r.last_layer}",
            r.runner or "-",
            _rank_state(r),
        ]
        for i in instances
        for r in i.ranks
    ]
    return ["INSTANCES", *table(INSTANCE_COLUMNS, rows)] if rows else []


def _rank_state(r: control_pb2.InstanceRank) -> str:
    """`sending 12.0/48.5 MB (24%)` while its node receives its part; its state otherwise."""
    if r.state == "sending" and r.weights_total > 0:
        return f"sending {_share(r.weights_sent, r.weights_total)}"
    return r.state


# The columns of the NODES section of `exoctl status` in a cluster (docs/cli.md).
NODE_COLUMNS = ("NODE", "NAME", "STATE", "ADDRESSES", "FREE", "TOTAL", "RUNNERS", "SEEN")


def node_lines(nodes: Sequence[control_pb2.NodeInfo], now: float) -> list[str]:
    """The members, this node first: liveness, memory and runners as last reported."""
    rows = []
    for n in nodes:
        state = f"{n.state} ({n.reason})" if n.reason else n.state
        seen = n.last_seen.ToNanoseconds() / 1e9 if n.HasField("last_seen") else None
        heard = n.state == "self" or n.memory_total_bytes > 0
        rows.append(
            [
                n.id,
                cut(n.name) or "-",
                state,
                cut(",".join(n.addresses)) or "-",
                human_bytes(n.memory_free_bytes) if heard else "-",
                human_bytes(n.memory_total_bytes) if heard else "-",
                str(n.runners),
                "-" if seen is None else f"{human_duration(max(now - seen, 0.0))} ago",
            ]
        )
    return ["NODES", *table(NODE_COLUMNS, rows)]


def node_json(n: control_pb2.NodeInfo) -> dict[str, Any]:
    return {
        "id": n.id,
        "name": n.name,
        "addresses": list(n.addresses),
        "state": n.state,
        "reason": n.reason or None,
        "memory_free_bytes": n.memory_free_bytes,
        "memory_total_bytes": n.memory_total_bytes,
        "runners": n.runners,
        "last_seen": rfc3339(n.last_seen) if n.HasField("last_seen") else None,
    }


def cluster_json(info: control_pb2.ClusterInfo) -> dict[str, Any]:
    return {"id": info.id, "ca_fingerprint": info.ca_fingerprint}


# --- events -------------------------------------------------------------------------------------

_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _payload_message(record: control_pb2.EventRecord) -> Message | None:
    which = record.event.WhichOneof("kind")
    return None if which is None else getattr(record.event, which)


def event_kind(record: control_pb2.EventRecord) -> str:
    """The payload's message name (RunnerFailed); the record's own kind for a kind this exoctl
    does not know (a newer daemon), whose payload then parses as empty."""
    message = _payload_message(record)
    return message.DESCRIPTOR.name if message is not None else record.kind or "Unknown"


def event_payload(record: control_pb2.EventRecord, *, with_defaults: bool) -> dict[str, Any]:
    """The payload's fields by their proto names, 64-bit integers as JSON numbers."""
    # Imported here: json_format costs start-up time that only `exoctl events` needs.
    from google.protobuf import json_format

    message = _payload_message(record)
    if message is None:
        return {}
    fields = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=with_defaults,
    )
    # The proto JSON mapping writes 64-bit integers as strings; a script wants numbers.
    for field in message.DESCRIPTOR.fields:
        if field.type in _INT64 and field.name in fields and not field.is_repeated:
            fields[field.name] = int(fields[field.name])
    return fields


def event_json(record: control_pb2.EventRecord) -> dict[str, Any]:
    """The record's envelope and its payload's fields at the top level (the envelope wins a
    clash of names, so `seq` and `kind` always mean the record's)."""
    envelope: dict[str, Any] = {
        "seq": record.seq,
        "origin": record.origin,
        "origin_seq": record.origin_seq,
        "ts": rfc3339(record.ts),
        "kind": event_kind(record),
    }
    payload = event_payload(record, with_defaults=True)
    return envelope | {k: v for k, v in payload.items() if k not in envelope}


def is_time_field(name: str) -> bool:
    """Payload fields named *_time or *_at hold a Unix time (RunnerSpawned.start_time); the
    other numbers are counts, durations (*_s) and rates."""
    return name.endswith(("_time", "_at"))


def _plain_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Quote whatever would not read back as one word.
        if not value or any(c.isspace() or c in '"=' for c in value):
            return json.dumps(value, ensure_ascii=False)
        return value
    if isinstance(value, float):
        return plain_number(value)  # people read 2.001, not 2.0011227029999645; --json keeps all
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _plain_field(key: str, value: Any) -> str:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return utc_time(value) if is_number and is_time_field(key) else _plain_value(value)


def event_line(record: control_pb2.EventRecord) -> str:
    """`SEQ  TIME  KIND  key=value ...`: times in UTC to the millisecond, fields left at their
    default omitted."""
    payload = event_payload(record, with_defaults=False)
    fields = " ".join(f"{k}={_plain_field(k, v)}" for k, v in payload.items())
    when = utc_time(record.ts.ToNanoseconds() / 1e9)
    return f"{record.seq}  {when}  {event_kind(record)}  {fields}".rstrip()


# --- run ----------------------------------------------------------------------------------------


def token_json(text: str) -> dict[str, Any]:
    return {"type": "token", "text": text}


def done_json(done: control_pb2.RunDone) -> dict[str, Any]:
    return {
        "type": "done",
        "prompt_tokens": done.prompt_tokens,
        "generation_tokens": done.generation_tokens,
        "ttft_s": done.ttft_s,
        "tokens_per_s": done.tokens_per_s,
        "stop_reason": done.stop_reason,
        "cached_tokens": done.cached_tokens,
        "instance": done.instance or None,
    }


def error_json(reason: str | None, message: str, exit_code: int) -> dict[str, Any]:
    return {"type": "error", "reason": reason, "message": message, "exit_code": exit_code}


def progress_text(progress: control_pb2.Progress) -> str:
    """`loading weights 3/24`, `sending weights to n-… 12.0/48.5 MB (24%)`; the counts that
    are unknown are left out."""
    if progress.unit == "bytes" and progress.total > 0:
        return f"{progress.phase} {_share(progress.current, progress.total)}"
    if progress.total > 0:
        return f"{progress.phase} {progress.current}/{progress.total}"
    if progress.current > 0:
        return f"{progress.phase} {progress.current}"
    return progress.phase


def _share(done: int, total: int) -> str:
    return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB ({100 * done // total}%)"


def started_text(started: control_pb2.RunStarted) -> str:
    if started.queue_position > 0:
        return f"queued for runner {started.runner_id} (position {started.queue_position})"
    return f"starting on runner {started.runner_id}"


# --- kill and models ----------------------------------------------------------------------------


def kill_json(reply: control_pb2.KillReply) -> dict[str, Any]:
    return {"killed": list(reply.killed)}


def model_json(model: control_pb2.ModelInfo) -> dict[str, Any]:
    return {"name": model.name, "path": model.path, "content_hash": model.content_hash}


def models_json(reply: control_pb2.ModelsReply) -> dict[str, Any]:
    return {"models": [model_json(m) for m in reply.models]}


def models_lines(reply: control_pb2.ModelsReply) -> list[str]:
    if not reply.models:
        return ["no models registered"]
    # A hash prefix identifies the weights at a glance; --json has all of it.
    rows = [[m.name, m.path, m.content_hash[:12] or "-"] for m in reply.models]
    return table(["NAME", "PATH", "HASH"], rows)
