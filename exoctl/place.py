"""`exoctl place MODEL`: where exod would run a model, over this node and its cluster's members,
without running anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import grpc

from exoctl.failures import Failure, one_line
from exoctl.options import connect, json_option, socket_option
from exoctl.terminal import print_json, print_lines
from exod.errors import exit_code
from exod.proto.exo.v1 import control_pb2


def parse_on(text: str) -> list[str]:
    """Node ids from `--on ID,ID`; ValueError for an empty or repeated one."""
    ids = [part.strip() for part in text.split(",")]
    if any(not i for i in ids):
        raise ValueError(f"{text!r} has an empty node id: give ids separated by commas")
    repeated = next((i for i in ids if ids.count(i) > 1), None)
    if repeated is not None:
        raise ValueError(f"{repeated} is named twice: name each node once")
    return ids


def plan_json(reply: control_pb2.PlaceReply) -> dict[str, Any]:
    """The --json contract (docs/cli.md)."""
    refused = reply.refused if reply.HasField("refused") else None
    return {
        "model": reply.model,
        "whole_on": reply.whole_on or None,
        "ranks": [
            {
                "rank": r.rank,
                "node": r.node,
                "layers": [r.first_layer, r.last_layer],
                "bytes": r.bytes,
            }
            for r in reply.ranks
        ],
        "refused": None
        if refused is None
        else {"reason": refused.reason, "message": refused.message},
    }


def plan_lines(reply: control_pb2.PlaceReply) -> list[str]:
    """`whole on NODE …` or one row per rank, for people."""
    from exoctl.render import human_bytes, table

    def node(r: control_pb2.PlacedRank) -> str:
        return f"{r.node} ({r.node_name})" if r.node_name else r.node

    if reply.whole_on and len(reply.ranks) == 1:
        (r,) = reply.ranks
        return [
            f"whole on {node(r)}: layers {r.first_layer}-{r.last_layer}, {human_bytes(r.bytes)}"
        ]
    rows = [
        [str(r.rank), node(r), f"{r.first_layer}-{r.last_layer}", human_bytes(r.bytes)]
        for r in reply.ranks
    ]
    return table(["RANK", "NODE", "LAYERS", "MEMORY"], rows)


@click.command("place", short_help="Show where a model would run in the cluster.")
@click.argument("model")
@click.option(
    "--on",
    "on",
    metavar="ID,ID",
    help="Place it on these nodes only: one id holds the whole model; several split it, rank 0 "
    "(the last layers) on the first.",
)
@json_option
@socket_option
def place_command(*, model: str, on: str | None, as_json: bool, socket: Path | None) -> None:
    """Print where exod would run MODEL, without running anything.

    exod plans over this node and every member of its cluster it can reach now, from the
    model's files (its layers and what each weighs) and the memory each member reports, less
    its EXOD_RESERVED_MEMORY and at most its EXOD_MAX_RUNNER_MEMORY. In this order it prefers:
    a member that has it loaded already; this node, when the whole model fits here; the member
    with the most room for the whole model; else the model's layers split over the members in
    proportion to their room (mlx-lm's pipeline: rank 0 holds the last layers, and every rank
    keeps the embeddings and the head). Outside a cluster it plans over this node alone.
    docs/cluster.md ("Placement") has the details.

    MODEL is named as for `exoctl run`. MEMORY is what each runner would need.

    \b
    Exit codes: 65 no plan fits (too large for the cluster, or an architecture mlx-lm cannot
    split), with the numbers; 66 an unknown model or --on node; 75 an --on node unreachable.
    A plan that cannot be made still prints its JSON with --json ("refused").

    \b
    Examples:
      exoctl place demo
      exoctl place ~/models/Qwen2.5-72B-Instruct-4bit
      exoctl place big --on n-3f2a9c01b2d4,n-8d0c41e7a5b2
      exoctl place big --json | jq '.ranks[] | {node, layers}'
    """
    from exoctl.arguments import explain_unknown_name, resolve_model

    try:
        nodes = parse_on(on) if on is not None else []
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--on'") from None
    try:
        request = control_pb2.PlaceRequest(model=resolve_model(model), on=nodes)
        with connect(socket) as client:
            reply = client.place(request)
    except Failure as f:
        raise explain_unknown_name(f, model) from None
    if as_json:
        print_json(plan_json(reply))
    if reply.HasField("refused"):
        # A reason this exoctl does not know (a newer exod's) exits as a plan that cannot run.
        code = exit_code(reply.refused.reason, grpc.StatusCode.FAILED_PRECONDITION)
        raise Failure(code, one_line(reply.refused.message, ""), reply.refused.reason)
    if not as_json:
        print_lines(plan_lines(reply))
