"""The exoctl command line: click commands that check their arguments, make one call to exod,
and print the answer as text for people or as JSON for scripts.

How each command ends (exit code, the one stderr line) is group.py's business; what they share
(--socket, --json) is options.py's.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import click

from exoctl.client import Client
from exoctl.group import ExoctlGroup
from exoctl.options import connect, json_option, socket_option
from exoctl.terminal import print_json, print_lines, say
from exod import API_VERSION, __version__
from exod.proto.exo.v1 import control_pb2

# Only grpc, the generated stubs and click are imported for every command: what one command
# alone needs (rendering, `run`'s output, `models`, `service`) is imported in that command, so
# that `exoctl status` starts about as fast as `import grpc` (docs/benchmarks.md).


@click.group(
    cls=ExoctlGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(
    __version__, prog_name="exoctl", message=f"%(prog)s %(version)s (api {API_VERSION})"
)
def cli() -> None:
    """Control exod, the daemon that runs language models on this machine.

    \b
    Examples:
      exoctl models demo               write and register a tiny demo model
      exoctl run demo "Hello"          generate; tokens stream to stdout
      echo "Hello" | exoctl run demo   the prompt from stdin, byte for byte
      exoctl status --all              what runs, how big; why runners ended
      exoctl events --follow --json    the event log, live, one JSON object a line
      exoctl kill --all                stop every runner
      exoctl cluster init              make a cluster; `cluster invite` / `join` add nodes
      exoctl place demo                where a model would run: one node, or split over several

    \b
    Exit codes (sysexits.h; docs/exit-codes.md):
      0 ok   64 usage   65 model cannot run here   66 not found
      69 exod unavailable   70 internal   75 temporary, retry later
      77 permission denied   78 configuration   130 interrupted
    """


# --- run ----------------------------------------------------------------------------------------


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # FloatRange lets nan and inf through; neither is a temperature.
    if not math.isfinite(value):
        raise click.BadParameter("must be a finite number", ctx=ctx, param=param)
    return value


def _read_prompt(argument: str | None) -> str:
    from exoctl.arguments import check_prompt_text, decode_prompt

    if argument is not None:
        return check_prompt_text(argument)
    if sys.stdin.isatty():
        say("reading the prompt from stdin; end it with Ctrl-D")
    return decode_prompt(sys.stdin.buffer.read(), "on stdin")


@cli.command("run")
@click.argument("model")
@click.argument("prompt", required=False)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1, max=2**31 - 1),
    default=256,
    show_default=True,
    help="Stop after generating this many tokens.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    callback=_finite,
    help="Sampling temperature; 0 is greedy decoding (the text mlx_lm.generate prints).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0, max=2**63 - 1),
    help="Seed for sampling, to repeat a run with temperature > 0.",
)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option(
    "--force",
    is_flag=True,
    help="Start the model even if exod estimates it will not fit in memory now; the runner "
    "memory cap (EXOD_MAX_RUNNER_MEMORY) is still enforced.",
)
@click.option(
    "--on",
    "on",
    metavar="ID,ID",
    help="Run it on these nodes: one runs it whole there; several split it, rank 0 (the last "
    "layers) on the first. This node may be left out (its text comes from the first), else it "
    "must be first (see `exoctl place`).",
)
@json_option
@socket_option
def run_command(
    *,
    model: str,
    prompt: str | None,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    raw: bool,
    force: bool,
    on: str | None,
    as_json: bool,
    socket: Path | None,
) -> None:
    """Generate text from MODEL for PROMPT (read from stdin when absent).

    MODEL is a registered name (`exoctl models list`), a model directory (anything with a `/`,
    or starting with `.` or `~`), or hf:ORG/NAME. A directory that does not exist fails at once
    with 66.

    Tokens go to stdout as they are generated, then one newline; progress goes to stderr, and
    only to a terminal. Ctrl-C cancels the generation in exod and exits 130.

    \b
    Examples:
      exoctl run demo "Write a haiku about RAM."
      exoctl run ~/models/qwen3-0.6b < prompt.txt
      exoctl run demo "Hi" --temperature 0.7 --seed 42 --max-tokens 64
      exoctl run demo "Hi" --json | jq -r 'select(.type=="token").text'
    """
    from exoctl.arguments import explain_unknown_name, resolve_model
    from exoctl.failures import Failure
    from exoctl.place import parse_on
    from exoctl.run import RunOutput, generate
    from exoctl.terminal import StatusLine

    try:
        nodes = parse_on(on) if on is not None else []
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--on'") from None
    out = RunOutput(sys.stdout.buffer, StatusLine(sys.stderr), as_json=as_json)
    try:
        request = control_pb2.RunRequest(
            model=resolve_model(model),
            prompt=_read_prompt(prompt),
            max_tokens=max_tokens,
            temperature=temperature,
            has_seed=seed is not None,
            seed=seed or 0,
            raw=raw,
            force=force,
            on=nodes,
        )
        with connect(socket) as client:
            generate(client, request, out)
    except Failure as f:
        failure = explain_unknown_name(f, model)
        out.failed(failure)
        raise failure from None


# --- status and kill ----------------------------------------------------------------------------


def fetch_status(client: Client, wait: float = 0.0) -> control_pb2.StatusReply:
    """Status, with the one check that exod and exoctl speak the same API version."""
    from exoctl import render

    reply = client.status(wait)
    warning = render.api_version_warning(reply)
    if warning:
        say(warning)
    return reply


@cli.command("status")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Also list the runners that ended (the most recent ones), with when and why.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0, max=3600),
    default=0,
    metavar="SECONDS",
    help="Wait up to SECONDS for exod to answer, as after starting it; 69 if it does not.",
)
@json_option
@socket_option
def status_command(*, show_all: bool, wait: float, as_json: bool, socket: Path | None) -> None:
    """Show exod and its runners: model, state, pids, requests, memory, prompt cache; with --all
    also the runners that ended, and why (idle, killed, or the reason it failed).

    Per runner: PID is its process group's leader, MLX_PID the process that runs MLX; ACTIVE the
    requests generating in its batch, QUEUED those waiting; CACHE what its prompt cache holds and
    HIT the share of prompt tokens it supplied (docs/cli.md).

    --json always lists every runner exod reports, live and ended: select them by state.

    \b
    Examples:
      exoctl status
      exoctl status --all
      exod 2>exod.log & exoctl status --wait 30 >/dev/null   # start exod, wait until it serves
      exoctl status --json | jq '.runners[] | select(.state=="failed")'
    """
    from exoctl import render

    with connect(socket) as client:
        reply = fetch_status(client, wait)
    if as_json:
        print_json(render.status_json(reply))
    else:
        print_lines(render.status_lines(reply, show_all=show_all, now=time.time()))


@cli.command("kill", short_help="Stop a runner, or all of them.")
@click.argument("runner_id", metavar="[ID]", required=False)
@click.option("--all", "kill_all", is_flag=True, help="Kill every runner.")
@json_option
@socket_option
def kill_command(
    *, runner_id: str | None, kill_all: bool, as_json: bool, socket: Path | None
) -> None:
    """Stop the runner ID (see `exoctl status`), or every runner with --all.

    Its model is unloaded and its memory returned; a run in progress on it fails with 75.
    Prints the ids of the runners it stopped.

    \b
    Examples:
      exoctl kill r-3f2a
      exoctl kill --all --json
    """
    if (runner_id is None) == (not kill_all):
        raise click.UsageError("give either a runner ID or --all", ctx=click.get_current_context())
    from exoctl import render

    with connect(socket) as client:
        reply = client.kill(None if kill_all else runner_id)
    if as_json:
        print_json(render.kill_json(reply))
    elif reply.killed:
        print_lines(reply.killed)
    else:
        say("no runners were running.")


# --- events -------------------------------------------------------------------------------------


@cli.command("events", short_help="Print the event log; --follow for live.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events; Ctrl-C stops.")
@click.option(
    "--since",
    type=click.IntRange(min=0),
    default=0,
    metavar="SEQ",
    help="Only events after this sequence number.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0, max=2**31 - 1),
    default=0,
    metavar="N",
    help="At most N events (0: no limit).",
)
@click.option(
    "--node",
    metavar="ID",
    default="",
    help="Only the events of this member (a node id from `exoctl status`).",
)
@json_option
@socket_option
def events_command(
    *, follow: bool, since: int, limit: int, node: str, as_json: bool, socket: Path | None
) -> None:
    """Print exod's event log: what started, loaded, failed and stopped, and why.

    One line per event: SEQ  TS  KIND  key=value ...; with --json one object per line, the
    event's fields at the top level. With --follow, Ctrl-C is the way to stop and exits 0.
    In a cluster the log holds the members' replicated events too, each with its own origin
    and origin_seq; --node ID shows one member's.

    \b
    Examples:
      exoctl events --limit 20
      exoctl events --since 120 --json | jq 'select(.kind=="RunnerFailed")'
      exoctl events --follow
      exoctl events --node n-3f2a9c01b2d4 --json
    """
    import grpc

    from exoctl import interrupt, render
    from exoctl.client import cancel
    from exoctl.interrupt import Ending

    request = control_pb2.EventsRequest(since=since, follow=follow, limit=limit, node=node)
    # Ctrl-C is how --follow ends, so there it is success; a listing cut short is interrupted.
    on_ctrl_c = Ending(code=0, message=None) if follow else Ending()
    with connect(socket) as client, interrupt.ending(on_ctrl_c):
        call = client.events(request)
        received = False
        try:
            for record in call:
                received = True
                line = render.json_line(render.event_json(record)) if as_json else None
                click.echo(line if line is not None else render.event_line(record))
                if follow:
                    sys.stdout.flush()  # a reader such as grep wants each event as it happens
        except BrokenPipeError:
            cancel(call)
            raise
        except grpc.RpcError as e:
            raise client.failure(e, mid_stream=received) from None


cli.add_lazy_command("models", "exoctl.models:models_group")
cli.add_lazy_command("place", "exoctl.place:place_command")
cli.add_lazy_command("cluster", "exoctl.cluster:cluster_group")
cli.add_lazy_command("service", "exoctl.service:service_group")
