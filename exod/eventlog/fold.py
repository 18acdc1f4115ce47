"""The daemon's state as a pure fold over its event log: no I/O, no clock, no randomness (but
for a log line when a removal that the cluster's CA did not sign is ignored).

`apply` takes a state and one record and returns the next state, matched on the record's kind.
Kinds it does not know are skipped (a newer exod may have written them), and facts about runners
or runs it has no record of change nothing, so any log, however odd, folds without an error.

State is keyed by origin: the records this node wrote build its runners, runs, models and
invites; those copied from a member (another origin) only build that member's `PeerView` (the
last origin_seq held, its live runners by id) and the list of members. A peer's ModelAdded or
RunnerSpawned therefore never reaches this node's registry or runner table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from exod.cluster import revocation
from exod.eventlog.records import Record, kind_of
from exod.proto.exo.v1 import events_pb2

# Bump whenever the meaning of the fold or the shape of `encode` changes: snapshots carry it,
# and a snapshot of another version is ignored and rebuilt from the log.
FOLD_VERSION: int = 6
# Ended runners kept for `exoctl status` to show why they ended; older ones are forgotten so the
# state, and so every snapshot, stays the same size however long the daemon runs.
MAX_ENDED_RUNNERS = 32

RunnerState = Literal["spawning", "ready", "stopped", "failed"]
_RUNNER_STATES: Mapping[str, RunnerState] = {
    "spawning": "spawning",
    "ready": "ready",
    "stopped": "stopped",
    "failed": "failed",
}
_ALIVE: frozenset[str] = frozenset({"spawning", "ready"})

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class ErrorView:
    reason: str
    detail: str


@dataclass(frozen=True)
class RunnerView:
    id: str
    model: str
    model_path: str
    pid: int
    start_time: float  # the process's create time: with pid, identifies it even if pids are reused
    log_path: str
    state: RunnerState
    spawned_at: float
    ended_at: float | None
    last_error: ErrorView | None  # why it failed; None unless state is "failed"
    # Why it ended, for `exoctl status`: RunnerStopped's reason (killed, idle, ...) or
    # RunnerFailed's; "" while it is alive.
    end_reason: str


@dataclass(frozen=True)
class RunView:
    """A run that was accepted and has not finished (finished runs leave the state)."""

    id: str
    runner_id: str
    model: str
    accepted_at: float


@dataclass(frozen=True)
class ModelView:
    name: str
    path: str
    content_hash: str
    owned: bool = False  # exod wrote the directory (an import, the demo): removing deletes it
    stop: tuple[str, ...] = ()  # default stop sequences for runs that give none


@dataclass(frozen=True)
class InviteView:
    """An invite this node issued: only the secret's digest is known, never the secret."""

    digest: str
    expires: float  # unix seconds
    used_by: str = ""  # the node that joined with it; "" while unused


@dataclass(frozen=True)
class MemberView:
    """A node that joined the cluster through this node (its CA's holder)."""

    id: str
    name: str
    addresses: tuple[str, ...]
    port: int
    cert_fingerprint: str
    # Out of the cluster by a CA-signed NodeRemoved: every call of it is refused.
    removed: bool = False


@dataclass(frozen=True)
class RemovedView:
    """A node a verified NodeRemoved took out of the cluster (kept even if never a member here)."""

    id: str
    cert_fingerprint: str
    ts: float  # when the CA's node signed it
    how: str  # "remove" or "leave"


@dataclass(frozen=True)
class PeerView:
    """What this node holds of another member's stream."""

    id: str
    held: int  # the highest origin_seq of it in this log
    runners: tuple[str, ...] = ()  # its runners that its log says are alive, by id
    # (runner id, content hash of its model) of those runners: what model each runs there.
    models: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class State:
    runners: Mapping[str, RunnerView]
    runs: Mapping[str, RunView]
    models: Mapping[str, ModelView]
    last_seq: int  # the seq of the last record folded in
    starts: int  # how many times this node's daemon has started
    # Invites are forgotten once expired (at the next one issued), so they stay few.
    invites: Mapping[str, InviteView] = field(default_factory=lambda: MappingProxyType({}))
    members: Mapping[str, MemberView] = field(default_factory=lambda: MappingProxyType({}))
    ca_node: str = ""  # the node holding the cluster's CA key, as of the last ClusterEntered
    # Other members' streams as this log holds them, by origin (see apply's `own`).
    peers: Mapping[str, PeerView] = field(default_factory=lambda: MappingProxyType({}))
    # The cluster's CA certificate (PEM), as of the last ClusterEntered: removals are checked
    # with it before they are obeyed.
    ca_cert: str = ""
    removed: Mapping[str, RemovedView] = field(default_factory=lambda: MappingProxyType({}))
    # The split models this node coordinates that its log says run (placed, not ended): model
    # by instance id. Found at the next start after a crash, and closed as interrupted.
    instances: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def _frozen(items: dict[K, V]) -> Mapping[K, V]:
    return MappingProxyType(items)


EMPTY = State(runners=_frozen({}), runs=_frozen({}), models=_frozen({}), last_seq=0, starts=0)


def apply(state: State, record: Record, own: str = "") -> State:
    """The state after one more record. Every record, even one skipped, advances last_seq.

    `own` is the id of the node whose log this is: a record of another origin (copied from a
    member) folds into that member's view only. "" treats every record as this node's own."""
    # A kind this exod's schema does not know parses with no oneof field set, so the names differ.
    known = kind_of(record.event) == record.kind
    if own and record.origin != own:
        after = _apply_peer(state, record, own, known=known)
    else:
        after = _apply(state, record, own) if known else state
    return replace(after, last_seq=record.seq)


def fold(records: Iterable[Record], state: State = EMPTY, own: str = "") -> State:
    for record in records:
        state = apply(state, record, own)
    return state


def running_elsewhere(state: State, content_hash: str) -> list[str]:
    """The members whose replicated log says a runner of theirs runs the model with this
    content hash, by id."""
    return sorted(p.id for p in state.peers.values() if any(m[1] == content_hash for m in p.models))


def alive_runners(state: State) -> list[RunnerView]:
    """Runners the log says are alive (spawning or ready), oldest first."""
    alive = [r for r in state.runners.values() if r.state in _ALIVE]
    return sorted(alive, key=lambda r: (r.spawned_at, r.id))


def _apply(state: State, record: Record, own: str) -> State:  # noqa: PLR0911, PLR0912  one case per kind reads best
    e, ts = record.event, record.ts
    match record.kind:
        case "NodeStarted":
            return replace(state, starts=state.starts + 1)
        case "RunnerSpawned":
            s = e.runner_spawned
            runner = RunnerView(
                id=s.runner_id,
                model=s.model,
                model_path=s.model_path,
                pid=s.pid,
                start_time=s.start_time,
                log_path=s.log_path,
                state="spawning",
                spawned_at=ts,
                ended_at=None,
                last_error=None,
                end_reason="",
            )
            return replace(state, runners=_with(state.runners, runner.id, runner))
        case "RunnerReady":
            return _ready(state, e.runner_ready.runner_id)
        case "RunnerFailed":
            f = e.runner_failed
            return _ended(state, f.runner_id, ts, f.reason, ErrorView(f.reason, f.detail))
        case "RunnerStopped":
            # Being asked to stop is not an error, whatever the reason (interrupted included).
            stop = e.runner_stopped
            return _ended(state, stop.runner_id, ts, stop.reason, None)
        case "RunAccepted":
            # Kept even when its runner is unknown: a run that is in the log must be found in
            # flight at the next start, so that it can be closed as interrupted.
            a = e.run_accepted
            run = RunView(id=a.run_id, runner_id=a.runner_id, model=a.model, accepted_at=ts)
            return replace(state, runs=_with(state.runs, run.id, run))
        case "RunFinished":
            return replace(state, runs=_without(state.runs, e.run_finished.run_id))
        case "ModelAdded":
            m = e.model_added
            model = ModelView(
                name=m.name,
                path=m.path,
                content_hash=m.content_hash,
                owned=m.owned,
                stop=tuple(m.stop),
            )
            return replace(state, models=_with(state.models, model.name, model))
        case "ModelRemoved":
            return replace(state, models=_without(state.models, e.model_removed.name))
        case "InviteIssued":
            i = e.invite_issued
            live = {k: v for k, v in state.invites.items() if v.expires > ts}
            live[i.secret_digest] = InviteView(digest=i.secret_digest, expires=float(i.expires))
            return replace(state, invites=_frozen(live))
        case "NodeJoined":
            return _joined(state, e.node_joined, own)
        case "ClusterEntered":
            c = e.cluster_entered
            return replace(state, ca_node=c.ca_node_id, ca_cert=c.ca_cert.decode(errors="replace"))
        case "NodeRemoved":
            return _removed(state, e.node_removed, record)
        case "ClusterLeft":
            # Out of the cluster: whatever it knew of it no longer applies (a later join starts
            # afresh); what it holds of the members' streams stays in the log, under their ids.
            return replace(
                state,
                ca_node="",
                ca_cert="",
                members=EMPTY.members,
                removed=EMPTY.removed,
                invites=EMPTY.invites,
            )
        case "MembersLearned":
            return _learned(state, e.members_learned, own)
        case "InstancePlaced":
            placed = e.instance_placed
            return replace(
                state, instances=_with(state.instances, placed.instance_id, placed.model)
            )
        case "InstanceEnded":
            return replace(state, instances=_without(state.instances, e.instance_ended.instance_id))
        case _:
            # NodeStopped changes nothing; it is logged for people reading `exoctl events`.
            return state


def _apply_peer(state: State, record: Record, own: str, *, known: bool) -> State:
    """A record another member wrote: only its view, and membership, change."""
    peer = state.peers.get(record.origin) or PeerView(id=record.origin, held=0)
    peer = replace(peer, held=max(peer.held, record.origin_seq))
    e = record.event
    match record.kind if known else "":
        case "RunnerSpawned":
            rid, digest = e.runner_spawned.runner_id, e.runner_spawned.content_hash
            if rid not in peer.runners:
                peer = replace(peer, runners=(*peer.runners, rid))
                if digest:
                    peer = replace(peer, models=(*peer.models, (rid, digest)))
        case "RunnerFailed" | "RunnerStopped":
            rid = e.runner_failed.runner_id or e.runner_stopped.runner_id
            peer = replace(
                peer,
                runners=tuple(r for r in peer.runners if r != rid),
                models=tuple(m for m in peer.models if m[0] != rid),
            )
        case "NodeJoined":
            # The CA's node admitted someone: every member learns of it this way.
            state = _joined(state, e.node_joined, own)
        case "NodeRemoved":
            state = _removed(state, e.node_removed, record)
        case _:
            pass
    return replace(state, peers=_with(state.peers, peer.id, peer))


def _learned(state: State, learned: events_pb2.MembersLearned, own: str) -> State:
    members = dict(state.members)
    for m in learned.members:
        if m.node_id == own:
            continue
        old = members.get(m.node_id)
        members[m.node_id] = MemberView(
            id=m.node_id,
            name=m.name,
            addresses=tuple(m.addresses),
            port=m.port,
            cert_fingerprint=old.cert_fingerprint if old is not None else "",
            removed=m.node_id in state.removed,
        )
    return replace(state, members=_frozen(members))


def _joined(state: State, j: events_pb2.NodeJoined, own: str) -> State:
    member = MemberView(
        id=j.node_id,
        name=j.name,
        addresses=tuple(j.addresses),
        port=j.port,
        cert_fingerprint=j.cert_fingerprint,
        removed=j.node_id in state.removed,  # a removal is for good: a later entry cannot undo it
    )
    invites = state.invites
    invite = invites.get(j.secret_digest)
    if invite is not None:
        invites = _with(invites, invite.digest, replace(invite, used_by=j.node_id))
    if own and j.node_id == own:
        return replace(state, invites=invites)  # this node, as the CA's node saw it join
    return replace(state, invites=invites, members=_with(state.members, member.id, member))


def _removed(state: State, r: events_pb2.NodeRemoved, record: Record) -> State:
    """Obeyed only when this cluster's CA signed it; else ignored (and logged), whoever wrote it."""
    if not revocation.verified(state.ca_cert.encode(), r):
        log.warning(
            "ignored a removal of %r (event %d of %s): it is not signed by this cluster's CA",
            r.node_id[:70],
            record.origin_seq,
            record.origin,
        )
        return state
    view = RemovedView(id=r.node_id, cert_fingerprint=r.cert_fingerprint, ts=float(r.ts), how=r.how)
    members = state.members
    member = members.get(r.node_id)
    if member is not None:
        members = _with(members, member.id, replace(member, removed=True))
    return replace(state, removed=_with(state.removed, view.id, view), members=members)


def _ready(state: State, runner_id: str) -> State:
    runner = state.runners.get(runner_id)
    if runner is None or runner.state != "spawning":
        return state
    return replace(state, runners=_with(state.runners, runner_id, replace(runner, state="ready")))


def _ended(state: State, runner_id: str, ts: float, reason: str, error: ErrorView | None) -> State:
    """The runner ended at `ts` for `reason`: failed with `error`, or stopped when it is None."""
    runner = state.runners.get(runner_id)
    # The first end of a runner is the one that counts; a later one cannot revive or rename it.
    if runner is None or runner.state not in _ALIVE:
        return state
    how: RunnerState = "stopped" if error is None else "failed"
    ended = replace(runner, state=how, ended_at=ts, last_error=error, end_reason=reason)
    return replace(state, runners=_bounded(_with(state.runners, runner_id, ended)))


def _bounded(runners: Mapping[str, RunnerView]) -> Mapping[str, RunnerView]:
    """Forget the runners that ended longest ago, beyond MAX_ENDED_RUNNERS."""
    ended = [r for r in runners.values() if r.state not in _ALIVE]
    if len(ended) <= MAX_ENDED_RUNNERS:
        return runners
    ended.sort(key=lambda r: (r.ended_at or 0.0, r.id))
    forget = {r.id for r in ended[: len(ended) - MAX_ENDED_RUNNERS]}
    return _frozen({k: v for k, v in runners.items() if k not in forget})


def _with(items: Mapping[K, V], key: K, value: V) -> Mapping[K, V]:
    return _frozen({**items, key: value})


def _without(items: Mapping[K, V], key: K) -> Mapping[K, V]:
    if key not in items:
        return items
    return _frozen({k: v for k, v in items.items() if k != key})


# ---- snapshots: the state as JSON, and back ----


def encode(state: State) -> bytes:
    doc = {
        "last_seq": state.last_seq,
        "starts": state.starts,
        "runners": [asdict(r) for r in state.runners.values()],
        "runs": [asdict(r) for r in state.runs.values()],
        "models": [asdict(m) for m in state.models.values()],
        "invites": [asdict(i) for i in state.invites.values()],
        "members": [asdict(m) for m in state.members.values()],
        "ca_node": state.ca_node,
        "peers": [asdict(p) for p in state.peers.values()],
        "ca_cert": state.ca_cert,
        "removed": [asdict(r) for r in state.removed.values()],
        "instances": dict(state.instances),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(data: bytes) -> State:
    """The state `encode` wrote; ValueError when data is not such a state (damaged, or foreign)."""
    try:
        doc = json.loads(data)
        return State(
            runners=_frozen({r.id: r for r in map(_runner, _list(doc, "runners"))}),
            runs=_frozen({r.id: r for r in map(_run, _list(doc, "runs"))}),
            models=_frozen({m.name: m for m in map(_model, _list(doc, "models"))}),
            last_seq=_int(doc, "last_seq"),
            starts=_int(doc, "starts"),
            invites=_frozen({i.digest: i for i in map(_invite, _list(doc, "invites", []))}),
            members=_frozen({m.id: m for m in map(_member, _list(doc, "members", []))}),
            ca_node=_str({"ca_node": doc.get("ca_node", "")}, "ca_node"),
            peers=_frozen({p.id: p for p in map(_peer, _list(doc, "peers", []))}),
            ca_cert=_str({"ca_cert": doc.get("ca_cert", "")}, "ca_cert"),
            removed=_frozen({r.id: r for r in map(_removal, _list(doc, "removed", []))}),
            instances=_frozen(_instances(doc.get("instances", {}))),
        )
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"not a state of fold version {FOLD_VERSION}: {e!r}") from None


def _runner(d: Any) -> RunnerView:
    error = d["last_error"]
    return RunnerView(
        id=_str(d, "id"),
        model=_str(d, "model"),
        model_path=_str(d, "model_path"),
        pid=_int(d, "pid"),
        start_time=_float(d, "start_time"),
        log_path=_str(d, "log_path"),
        state=_RUNNER_STATES[_str(d, "state")],
        spawned_at=_float(d, "spawned_at"),
        ended_at=None if d["ended_at"] is None else _float(d, "ended_at"),
        last_error=None
        if error is None
        else ErrorView(_str(error, "reason"), _str(error, "detail")),
        end_reason=_str(d, "end_reason"),
    )


def _run(d: Any) -> RunView:
    return RunView(
        id=_str(d, "id"),
        runner_id=_str(d, "runner_id"),
        model=_str(d, "model"),
        accepted_at=_float(d, "accepted_at"),
    )


def _model(d: Any) -> ModelView:
    # owned and stop came later: a snapshot written before them reads as their defaults.
    owned = d.get("owned", False)
    stop = d.get("stop", [])
    if not isinstance(owned, bool):
        raise TypeError("owned is not a boolean")
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise TypeError("stop is not a list of strings")
    return ModelView(
        name=_str(d, "name"),
        path=_str(d, "path"),
        content_hash=_str(d, "content_hash"),
        owned=owned,
        stop=tuple(stop),
    )


def _invite(d: Any) -> InviteView:
    return InviteView(
        digest=_str(d, "digest"), expires=_float(d, "expires"), used_by=_str(d, "used_by")
    )


def _member(d: Any) -> MemberView:
    addresses = _list(d, "addresses")
    if not all(isinstance(a, str) for a in addresses):
        raise TypeError("addresses is not a list of strings")
    return MemberView(
        id=_str(d, "id"),
        name=_str(d, "name"),
        addresses=tuple(addresses),
        port=_int(d, "port"),
        cert_fingerprint=_str(d, "cert_fingerprint"),
        removed=d.get("removed", False) is True,
    )


def _removal(d: Any) -> RemovedView:
    return RemovedView(
        id=_str(d, "id"),
        cert_fingerprint=_str(d, "cert_fingerprint"),
        ts=_float(d, "ts"),
        how=_str(d, "how"),
    )


def _instances(d: Any) -> dict[str, str]:
    if not isinstance(d, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in d.items()
    ):
        raise TypeError("instances is not a map of strings")
    return dict(d)


def _peer(d: Any) -> PeerView:
    runners = _list(d, "runners")
    if not all(isinstance(r, str) for r in runners):
        raise TypeError("runners is not a list of strings")
    models = _list(d, "models", [])
    if not all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in models
    ):
        raise TypeError("models is not a list of [runner id, content hash]")
    return PeerView(
        id=_str(d, "id"),
        held=_int(d, "held"),
        runners=tuple(runners),
        models=tuple((m[0], m[1]) for m in models),
    )


# Typed reads from parsed JSON: a value of the wrong type is a damaged snapshot, not a crash later.


def _str(d: Any, key: str) -> str:
    value = d[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    return value


def _int(d: Any, key: str) -> int:
    value = d[key]
    # bool is an int to isinstance, but true is no pid.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} is not an integer")
    return value


def _float(d: Any, key: str) -> float:
    value = d[key]
    # A time that happened to be a whole number may have been written from an int.
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{key} is not a number")
    return float(value)


def _list(d: Any, key: str, default: list[Any] | None = None) -> list[Any]:
    # A default for what came later (the cluster's invites and members) and may be absent.
    value = d[key] if default is None else d.get(key, default)
    if not isinstance(value, list):
        raise TypeError(f"{key} is not a list")
    return value
