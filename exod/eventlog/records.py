"""One entry of the event log, as read back: where it sits, who wrote it, and the event itself."""

from __future__ import annotations

from dataclasses import dataclass

from exod.proto.exo.v1 import events_pb2

# The oneof field name -> its message type's name ("runner_failed" -> "RunnerFailed"), read from
# the schema so that an event added to events.proto gets its kind without touching this module.
_KINDS: dict[str, str] = {
    field.name: field.message_type.name
    for field in events_pb2.Event.DESCRIPTOR.oneofs_by_name["kind"].fields
    if field.message_type is not None  # every kind is a message; this only tells the type checker
}


@dataclass(frozen=True)
class Record:
    seq: int  # local order in this database (AUTOINCREMENT, never reused)
    origin: str  # the node that wrote the event; each node is the only writer of its stream
    origin_seq: int  # the event's place in its origin's stream, from 1 without gaps
    ts: float  # unix seconds, by the origin's clock
    kind: str  # as stored; may name a kind this version does not know (a newer exod wrote it)
    event: events_pb2.Event


def kind_of(event: events_pb2.Event) -> str:
    """The name of the message set in the event's oneof ("RunnerFailed"); "" when none is set."""
    field = event.WhichOneof("kind")
    return "" if field is None else _KINDS[field]
