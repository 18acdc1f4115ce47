"""`exoctl place`'s pure parts: --on's ids, the --json contract and the text for people."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exoctl.place import parse_on, plan_json, plan_lines
from exod.proto.exo.v1 import control_pb2

A, B = "n-00000000000a", "n-00000000000b"
GIB = 1 << 30


def whole() -> control_pb2.PlaceReply:
    reply = control_pb2.PlaceReply(model="demo", whole_on=A)
    reply.ranks.add(rank=0, node=A, node_name="studio", first_layer=0, last_layer=27, bytes=GIB)
    return reply


def split() -> control_pb2.PlaceReply:
    reply = control_pb2.PlaceReply(model="/m/qwen2-72b")
    reply.ranks.add(rank=0, node=A, node_name="studio", first_layer=50, last_layer=79, bytes=GIB)
    reply.ranks.add(rank=1, node=B, first_layer=0, last_layer=49, bytes=3 * GIB // 2)
    return reply


def test_on_ids() -> None:
    assert parse_on(A) == [A]
    assert parse_on(f"{B}, {A}") == [B, A]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "has an empty node id"),
        (f"{A},", "has an empty node id"),
        (f"{A},{B},{A}", f"{A} is named twice"),
    ],
)
def test_on_ids_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_on(text)


def test_json_of_a_whole_placement() -> None:
    assert plan_json(whole()) == {
        "model": "demo",
        "whole_on": A,
        "ranks": [{"rank": 0, "node": A, "layers": [0, 27], "bytes": GIB}],
        "refused": None,
    }


def test_json_of_a_split() -> None:
    assert plan_json(split()) == {
        "model": "/m/qwen2-72b",
        "whole_on": None,
        "ranks": [
            {"rank": 0, "node": A, "layers": [50, 79], "bytes": GIB},
            {"rank": 1, "node": B, "layers": [0, 49], "bytes": 3 * GIB // 2},
        ],
        "refused": None,
    }


def test_json_of_a_refusal() -> None:
    reply = control_pb2.PlaceReply(model="big")
    reply.refused.reason = "model_too_large"
    reply.refused.message = "this model needs about 80.00 GiB; …"
    assert plan_json(reply) == {
        "model": "big",
        "whole_on": None,
        "ranks": [],
        "refused": {"reason": "model_too_large", "message": "this model needs about 80.00 GiB; …"},
    }


def test_text_of_a_whole_placement() -> None:
    assert plan_lines(whole()) == [f"whole on {A} (studio): layers 0-27, 1.0 GiB"]


def test_text_of_a_split() -> None:
    assert plan_lines(split()) == [
        "RANK  NODE                     LAYERS  MEMORY",
        f"0     {A} (studio)  50-79   1.0 GiB",
        f"1     {B}           0-49    1.5 GiB",
    ]


def test_the_docs_show_the_json_contract() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    (line,) = [x for x in docs.read_text().splitlines() if x.startswith('{"model":')]
    shown = json.loads(line)
    assert set(shown) == set(plan_json(split()))
    assert set(shown["ranks"][0]) == set(plan_json(split())["ranks"][0])
