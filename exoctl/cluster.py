"""`exoctl cluster`: make a cluster, invite a node into it, join one, leave it, remove a node."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from exoctl.failures import Failure, one_line
from exoctl.group import Group
from exoctl.options import connect, json_option, socket_option
from exoctl.terminal import print_json, say
from exod.errors import REASONS, ExoError
from exod.proto.exo.v1 import control_pb2

_TTL = re.compile(r"(\d+)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_S = 7 * 86400


def parse_ttl(text: str) -> int:
    """Seconds from `900`, `90s`, `15m`, `2h` or `1d`; ValueError saying what is accepted."""
    match = _TTL.fullmatch(text.strip().lower())
    seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_TTL_S:
        raise ValueError(
            f"{text!r} is not a duration from 1s to 7d: give seconds or a number with s, m, h "
            "or d, e.g. 15m"
        )
    return seconds


class Ttl(click.ParamType):  # type: ignore[type-arg]  # generic in the stubs only
    name = "DURATION"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_ttl(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.group("cluster", cls=Group)
def cluster_group() -> None:
    """Join this machine's exod with others on the LAN into one cluster.

    A cluster is a certificate authority (CA) made on its first node; every member holds a
    certificate of it, and members talk only to each other, over mutual TLS on the peer port
    (EXOD_PEER_PORT). Nothing listens on that port before `init` or `join` (docs/cluster.md).

    \b
    On the first machine:   exoctl cluster init
    On any member:          exoctl cluster invite        # prints a one-time token
    On the new machine:     exoctl cluster join TOKEN
    To take a node out:     exoctl cluster remove NODE   # on any other member
                            exoctl cluster leave         # or on that node

    The first machine holds the CA key: an invite or removal made on another member is made
    by it, over mutual TLS, so it must be reachable then; runs, status and replication never
    need it.

    \b
    Exit codes: 64 a garbled token, already a member, or the CA's node leaving or removing
    itself; 77 the token was used or expired; 66 remove of a node that is not a member;
    75 the inviter or the CA's node did not answer (EXOD_PEER_TIMEOUT).
    """


def _print_cluster(reply: control_pb2.ClusterReply, as_json: bool) -> None:
    from exoctl import render

    if as_json:
        print_json({"cluster": render.cluster_json(reply.cluster), "node_id": reply.node_id})
    else:
        click.echo(f"cluster {reply.cluster.id}  CA {reply.cluster.ca_fingerprint}")


@cluster_group.command("init")
@json_option
@socket_option
def cluster_init(*, as_json: bool, socket: Path | None) -> None:
    """Make a new cluster with this node as its first member.

    Makes the cluster's CA (its key stays in EXOD_HOME/tls/ca.key: back it up, docs/cluster.md)
    and this node's certificate, and starts listening on the peer port. Prints the cluster id
    and the CA certificate's SHA-256 fingerprint. A node already in a cluster exits 64.

    \b
    Examples:
      exoctl cluster init
      exoctl cluster init --json | jq -r .cluster.id
    """
    with connect(socket) as client:
        reply = client.cluster_init()
    _print_cluster(reply, as_json)


@cluster_group.command("invite")
@click.option(
    "--ttl",
    type=Ttl(),
    default="15m",
    show_default=True,
    help="How long the token may be used: seconds, or with s, m, h or d (up to 7d).",
)
@json_option
@socket_option
def cluster_invite(*, ttl: int, as_json: bool, socket: Path | None) -> None:
    """Print a one-time token that lets one more node join this cluster.

    The token holds this node's addresses and join port, the CA's fingerprint (so the joiner can
    tell it reached this cluster) and a secret that admits one node, once, until it expires.
    Treat it like a password until it is used. Any member can invite: on a member without the
    CA key, the node that holds it makes the secret and later admits the joiner, so it must be
    reachable (else 75, naming it). Outside a cluster it exits 64.

    The token is printed alone on one line; --json prints {"token", "expires"} (RFC 3339).

    \b
    Examples:
      exoctl cluster invite
      exoctl cluster invite --ttl 1h
      TOKEN=$(exoctl cluster invite) && ssh other-mac exoctl cluster join "$TOKEN"
    """
    from exoctl import render

    with connect(socket) as client:
        reply = client.cluster_invite(ttl)
    if as_json:
        expires = render.utc_time(reply.expires)
        print_json({"token": reply.token, "expires": expires})
        return
    click.echo(reply.token)
    if sys.stdout.isatty():
        until = render.utc_time(reply.expires)
        say(f"valid until {until}; on the new node: exoctl cluster join TOKEN")


@cluster_group.command("join")
@click.argument("token")
@json_option
@socket_option
def cluster_join(*, token: str, as_json: bool, socket: Path | None) -> None:
    """Join the cluster that TOKEN (from `exoctl cluster invite` on a member) invites to.

    exod connects to the inviter, checks that its CA is the one the token names, proves the
    token's secret, and receives a certificate for a key made here that never leaves this
    machine. Then it listens on its own peer port. Prints the cluster id and CA fingerprint.

    \b
    Exit codes: 64 a garbled token or already a member; 77 a used or expired token;
    75 the inviter did not answer within EXOD_PEER_TIMEOUT.

    \b
    Examples:
      exoctl cluster join exo1-...
      exoctl cluster join "$(cat token.txt)" --json
    """
    from exod.cluster import invite

    try:
        invite.decode(token)  # a garbled token is told here, before any connection
    except ExoError as e:
        raise Failure(REASONS[e.reason].exit, one_line(e.message, ""), e.reason) from None
    with connect(socket) as client:
        reply = client.cluster_join(token)
    _print_cluster(reply, as_json)


@cluster_group.command("remove")
@click.argument("node")
@json_option
@socket_option
def cluster_remove(*, node: str, as_json: bool, socket: Path | None) -> None:
    """Take NODE (its id, as `exoctl status` lists it) out of this cluster, for good.

    Writes an entry signed by the cluster's CA that every member copies and enforces: each
    refuses every call of NODE from then on, even while the CA's node is off. Any member can
    remove: the node that holds the CA key signs the entry, so it must be reachable (else 75,
    naming it). Models loaded anywhere keep running. Removing a node removed already succeeds
    and changes nothing.

    \b
    Exit codes: 66 NODE is not a member; 64 NODE is the CA's node or this node (use `leave`),
    or outside a cluster; 75 the CA's node did not answer (EXOD_PEER_TIMEOUT).

    \b
    Examples:
      exoctl cluster remove n-0b41d2e8a9c3
      exoctl cluster remove n-0b41d2e8a9c3 --json
    """
    from exoctl import render

    with connect(socket) as client:
        reply = client.cluster_remove(node)
    if as_json:
        print_json({"removed": reply.node_id, "cluster": render.cluster_json(reply.cluster)})
    else:
        click.echo(f"removed {reply.node_id} from cluster {reply.cluster.id}")


@cluster_group.command("leave")
@json_option
@socket_option
def cluster_leave(*, as_json: bool, socket: Path | None) -> None:
    """Leave this node's cluster: the CA's node removes it, then it forgets its TLS files.

    The CA's node writes the same signed entry as `remove`, so every member refuses this node
    from then on; this node then deletes EXOD_HOME/tls, stops listening on the peer port and
    belongs to no cluster. Its loaded models keep running. To join again later, it needs a
    fresh home (a removal is for good for its node id: docs/cluster.md).

    \b
    Exit codes: 75 the CA's node did not answer (this node stays a member; retry);
    64 this node is the CA's node, or in no cluster.

    \b
    Examples:
      exoctl cluster leave
      exoctl cluster leave --json
    """
    from exoctl import render

    with connect(socket) as client:
        reply = client.cluster_leave()
    if as_json:
        print_json({"left": render.cluster_json(reply.cluster), "node_id": reply.node_id})
    else:
        click.echo(f"left cluster {reply.cluster.id}")
