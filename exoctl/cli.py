"""The exoctl command line: click commands that check their arguments, make one call to exod,
and print the answer as text for people or as JSON for scripts.

Every way out goes through ExoctlGroup.main, which turns each failure into one line on stderr and
an exit code from sysexits.h (docs/exit-codes.md): click's usage errors become 64 rather than
click's 2, and a reader that closes stdout ends the command quietly with 0.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from exoctl import render
from exoctl.arguments import (
    check_name,
    check_prompt_text,
    decode_prompt,
    default_socket,
    model_dir,
    resolve_model,
)
from exoctl.client import Client, cancel
from exoctl.failures import Failure, one_line
from exoctl.run import RunOutput, generate
from exoctl.terminal import StatusLine, silence_stdout
from exod import API_VERSION, __version__
from exod.errors import Exit
from exod.proto.exo.v1 import control_pb2

F = TypeVar("F", bound=Callable[..., Any])


def say(message: str) -> None:
    """One line on stderr, prefixed so that it is clear which program spoke."""
    click.echo(f"exoctl: {message}", err=True)


def _usage_line(e: click.UsageError) -> str:
    command = e.ctx.command_path if e.ctx is not None else "exoctl"
    return one_line(e.format_message(), f"see `{command} --help`")


def _internal_line(e: Exception) -> str:
    import traceback  # noqa: PLC0415  (only on a bug: keep it off the start-up path)

    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return one_line(f"internal error in exoctl: {type(e).__name__}: {e}{at}", "please report it")


class ExoctlGroup(click.Group):
    """The top-level group; it owns the exit code of every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader has all it wanted (`| head`): not a failure. Caught here because
            # click's own handler would exit 1.
            silence_stdout()
            return None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        code = self._exit_code(args, prog_name, complete_var, windows_expand_args, extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _exit_code(
        self,
        args: Sequence[str] | None,
        prog_name: str | None,
        complete_var: str | None,
        windows_expand_args: bool,
        extra: dict[str, Any],
    ) -> int:
        try:
            rv = super().main(
                args,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
            # Non-standalone click returns the code of a ctx.exit() (--help, --version).
            code = rv if isinstance(rv, int) else Exit.OK
        except Failure as f:
            say(f.message)
            code = f.code
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # `exoctl` alone: the help is the message
            code = Exit.USAGE
        except click.UsageError as e:
            say(_usage_line(e))
            code = Exit.USAGE
        except click.ClickException as e:
            say(one_line(e.format_message(), ""))
            code = Exit.USAGE
        except click.Abort:
            say("interrupted.")
            code = Exit.INTERRUPTED
        except Exception as e:
            say(_internal_line(e))
            code = Exit.INTERNAL
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            silence_stdout()
        return int(code)


def socket_option(f: F) -> F:
    """--socket, shared by every command so that it can be given after the command's name."""
    return click.option(
        "--socket",
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="PATH",
        envvar="EXOD_SOCKET",
        show_envvar=True,
        help="exod's control socket  [default: exod.sock in EXOD_HOME, else in the state dir]",
    )(f)


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (see docs/cli.md) instead of text."
    )(f)


def connect(socket: Path | None) -> Client:
    path = socket.expanduser().absolute() if socket else default_socket(os.environ)
    return Client(path)


def print_json(obj: dict[str, Any]) -> None:
    click.echo(render.json_line(obj))


def print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        click.echo(line)


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
      exoctl status                    what runs, how big, why it failed
      exoctl events --follow --json    the event log, live, one JSON object a line
      exoctl kill --all                stop every runner

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
    as_json: bool,
    socket: Path | None,
) -> None:
    """Generate text from MODEL for PROMPT (read from stdin when absent).

    MODEL is a registered name (`exoctl models list`), a model directory (anything with a `/`,
    or starting with `.` or `~`, or naming a directory here), or hf:ORG/NAME. A directory that
    does not exist fails at once with 66.

    Tokens go to stdout as they are generated, then one newline; progress goes to stderr, and
    only to a terminal. Ctrl-C cancels the generation in exod and exits 130.

    \b
    Examples:
      exoctl run demo "Write a haiku about RAM."
      exoctl run ~/models/qwen3-0.6b < prompt.txt
      exoctl run demo "Hi" --temperature 0.7 --seed 42 --max-tokens 64
      exoctl run demo "Hi" --json | jq -r 'select(.type=="token").text'
    """
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
        )
        with connect(socket) as client:
            generate(client, request, out)
    except Failure as f:
        out.failed(f)
        raise


# --- status and kill ----------------------------------------------------------------------------


def fetch_status(client: Client) -> control_pb2.StatusReply:
    """Status, with the one check that exod and exoctl speak the same API version."""
    reply = client.status()
    warning = render.api_version_warning(reply)
    if warning:
        say(warning)
    return reply


@cli.command("status")
@json_option
@socket_option
def status_command(*, as_json: bool, socket: Path | None) -> None:
    """Show exod and its runners: model, state, pid, memory, last error.

    \b
    Examples:
      exoctl status
      exoctl status --json | jq '.runners[] | select(.state=="failed")'
    """
    with connect(socket) as client:
        reply = fetch_status(client)
    if as_json:
        print_json(render.status_json(reply))
    else:
        print_lines(render.status_lines(reply))


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
@json_option
@socket_option
def events_command(
    *, follow: bool, since: int, limit: int, as_json: bool, socket: Path | None
) -> None:
    """Print exod's event log: what started, loaded, failed and stopped, and why.

    One line per event: SEQ  TS  KIND  key=value ...; with --json one object per line, the
    event's fields at the top level. With --follow, Ctrl-C is the way to stop and exits 0.

    \b
    Examples:
      exoctl events --limit 20
      exoctl events --since 120 --json | jq 'select(.kind=="RunnerFailed")'
      exoctl events --follow
    """
    request = control_pb2.EventsRequest(since=since, follow=follow, limit=limit)
    with connect(socket) as client:
        call = client.events(request)
        received = False
        try:
            for record in call:
                received = True
                line = render.json_line(render.event_json(record)) if as_json else None
                click.echo(line if line is not None else render.event_line(record))
                if follow:
                    sys.stdout.flush()  # a reader such as grep wants each event as it happens
        except KeyboardInterrupt:
            cancel(call)
            if not follow:
                raise
            if sys.stderr.isatty():
                click.echo(err=True)  # end the line that the terminal's ^C started
        except BrokenPipeError:
            cancel(call)
            raise
        except grpc.RpcError as e:
            raise client.failure(e, mid_stream=received) from None


# --- models -------------------------------------------------------------------------------------


def _registered(reply: control_pb2.ModelsReply, name: str) -> control_pb2.ModelInfo:
    for model in reply.models:
        if model.name == name:
            return model
    raise Failure(
        Exit.INTERNAL,
        one_line(f"exod did not report model {name!r} after registering it", "see `exoctl events`"),
    )


@cli.group("models")
def models_group() -> None:
    """List, add and remove the models that `exoctl run` knows by name.

    \b
    Examples:
      exoctl models demo
      exoctl models add qwen3 ~/models/Qwen3-0.6B-4bit
      exoctl models list
      exoctl models rm qwen3
    """


@models_group.command("list")
@json_option
@socket_option
def models_list(*, as_json: bool, socket: Path | None) -> None:
    """List the registered models: name, directory, content hash."""
    with connect(socket) as client:
        reply = client.models(control_pb2.ModelsRequest(action=control_pb2.ModelsRequest.LIST))
    if as_json:
        print_json(render.models_json(reply))
    else:
        print_lines(render.models_lines(reply))


@models_group.command("add")
@click.argument("name")
@click.argument("directory", metavar="DIR")
@json_option
@socket_option
def models_add(*, name: str, directory: str, as_json: bool, socket: Path | None) -> None:
    """Register the model in DIR as NAME, so that `exoctl run NAME` runs it.

    NAME is 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit. DIR must exist; it is
    recorded as an absolute path.
    """
    request = control_pb2.ModelsRequest(
        action=control_pb2.ModelsRequest.ADD, name=check_name(name), path=str(model_dir(directory))
    )
    with connect(socket) as client:
        model = _registered(client.models(request), name)
    if as_json:
        print_json(render.model_json(model))
    else:
        click.echo(f"added {model.name}: {model.path}")


@models_group.command("rm")
@click.argument("name")
@json_option
@socket_option
def models_rm(*, name: str, as_json: bool, socket: Path | None) -> None:
    """Forget the model NAME (its files are left alone)."""
    request = control_pb2.ModelsRequest(
        action=control_pb2.ModelsRequest.REMOVE, name=check_name(name)
    )
    with connect(socket) as client:
        client.models(request)
    if as_json:
        print_json({"removed": name})
    else:
        click.echo(f"removed {name}")


@models_group.command("demo")
@click.option("--name", default="demo", show_default=True, help="Register it under this name.")
@json_option
@socket_option
def models_demo(*, name: str, as_json: bool, socket: Path | None) -> None:
    """Have exod write a tiny model with random weights and register it.

    It loads in a moment and runs anywhere, to try exod out; being random, it writes gibberish.

    \b
    Example:
      exoctl models demo && exoctl run demo "Hello"
    """
    request = control_pb2.ModelsRequest(
        action=control_pb2.ModelsRequest.DEMO, name=check_name(name)
    )
    with connect(socket) as client:
        model = _registered(client.models(request), name)
    if as_json:
        print_json(render.model_json(model))
    else:
        click.echo(f"registered demo model {model.name}: {model.path}")
        click.echo(
            f"note: its weights are random, so it writes gibberish by design; "
            f'try `exoctl run {model.name} "Hello"`'
        )
