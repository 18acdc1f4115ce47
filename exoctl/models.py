"""`exoctl models`: the registry of names that `exoctl run NAME` accepts, and imports into it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc

from exoctl import interrupt, render
from exoctl.arguments import check_name, model_dir
from exoctl.client import Client
from exoctl.failures import Failure, one_line
from exoctl.group import Group
from exoctl.interrupt import Ending
from exoctl.options import connect, json_option, socket_option
from exoctl.terminal import StatusLine, print_json, print_lines
from exod.errors import REASONS, Exit, ExoError
from exod.proto.exo.v1 import control_pb2

OLLAMA_PREFIX = "ollama:"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF to import: the file (or a split set's first part), and what comes with it."""

    path: Path
    stop: tuple[str, ...]  # default stop sequences (an Ollama model's params)
    source: str  # what the user named, for messages


def gguf_source(text: str) -> GGUFSource | None:
    """What `models add NAME SOURCE` imports, or None when SOURCE is a model directory (to be
    registered in place). Failure 66 when nothing is there, 77 when it cannot be read; checked
    here, before any connection, like every argument."""
    if text.startswith(OLLAMA_PREFIX):
        return _ollama(text[len(OLLAMA_PREFIX) :])
    path = Path(text).expanduser().absolute()
    if path.is_dir():
        return None
    if not path.exists():
        what = "GGUF file" if path.name.endswith(".gguf") else "model directory or GGUF file"
        raise Failure(
            Exit.NOT_FOUND,
            one_line(
                f"{what} {path} does not exist",
                "give a model directory, a .gguf file (a split set by its -00001-of-N part), or "
                "ollama:MODEL[:TAG]",
            ),
            reason="model_not_found",
        )
    if not os.access(path, os.R_OK):
        raise Failure(
            Exit.PERMISSION,
            one_line(
                f"cannot read {path}: permission denied",
                "make it readable by you and by the user exod runs as",
            ),
            reason="permission_denied",
        )
    return GGUFSource(path=path, stop=(), source=str(path))


def _ollama(name: str) -> GGUFSource:
    # Light: json and paths only (the gguf package is for exod's converter).
    from exod.models.gguf.ollama import resolve

    try:
        found = resolve(name)
    except ExoError as e:
        raise Failure(REASONS[e.reason].exit, one_line(e.message, ""), e.reason) from None
    return GGUFSource(path=found.gguf, stop=found.stop, source=f"{OLLAMA_PREFIX}{found.name}")


def import_progress_text(name: str, p: control_pb2.ImportProgress) -> str:
    """`importing smollm2: 12/272 tensors, 45.1/93.8 MB (48%)` for the status line."""
    text = f"importing {name}: {p.tensors_done}/{p.tensors_total} tensors"
    if p.bytes_total > 0:
        mb_done, mb_total = p.bytes_done / 1e6, p.bytes_total / 1e6
        text += f", {mb_done:.1f}/{mb_total:.1f} MB ({100 * p.bytes_done // p.bytes_total}%)"
    return text


def import_progress_json(p: control_pb2.ImportProgress) -> dict[str, Any]:
    return {
        "type": "progress",
        "tensors_done": p.tensors_done,
        "tensors_total": p.tensors_total,
        "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total,
    }


def model_json(model: control_pb2.ModelInfo) -> dict[str, Any]:
    return {**render.model_json(model), "owned": model.owned, "stop": list(model.stop)}


# How an import ends on Ctrl-C: exod sees the connection close and ends the conversion.
CANCELLED = Failure(
    Exit.INTERRUPTED, "interrupted; the import was cancelled and nothing was kept.", "cancelled"
)


def import_gguf(
    client: Client, request: control_pb2.ImportRequest, status: StatusLine, *, as_json: bool
) -> control_pb2.ModelInfo:
    """Follow one import to its end: progress on the status line (or as JSON lines), the
    registered model returned; Failure otherwise, with the JSON error line already written."""

    def error_line(failure: Failure) -> bytes:
        if not as_json:
            return b""
        obj = render.error_json(failure.reason, failure.message, int(failure.code))
        return (render.json_line(obj) + "\n").encode()

    received = False
    with interrupt.ending(Ending(message=CANCELLED.message, stdout=lambda: error_line(CANCELLED))):
        call = client.import_model(request)
        try:
            for reply in call:
                received = True
                which = reply.WhichOneof("msg")
                if which == "progress" and as_json:
                    print_json(import_progress_json(reply.progress))
                elif which == "progress":
                    status.show(import_progress_text(request.name, reply.progress))
                elif which == "done":
                    status.clear()
                    return reply.done
        except grpc.RpcError as e:
            status.clear()
            failure = client.failure(e, mid_stream=received)
            details = e.details() if callable(getattr(e, "details", None)) else None
            if failure.reason is not None and details:
                # exod's words for a failed import already say what to do; the generic advice
                # for its exit code ("this model cannot run here") would only blur them.
                failure = Failure(failure.code, one_line(details, ""), failure.reason)
            sys.stdout.buffer.write(error_line(failure))
            raise failure from None
    status.clear()
    failure = Failure(
        Exit.UNAVAILABLE, one_line("exod ended the import without finishing it", "retry")
    )
    sys.stdout.buffer.write(error_line(failure))
    raise failure


def _registered(reply: control_pb2.ModelsReply, name: str) -> control_pb2.ModelInfo:
    for model in reply.models:
        if model.name == name:
            return model
    raise Failure(
        Exit.INTERNAL,
        one_line(f"exod did not report model {name!r} after registering it", "see `exoctl events`"),
    )


@click.group("models", cls=Group)
def models_group() -> None:
    """List, add (or import from GGUF) and remove the models that `exoctl run` knows by name.

    \b
    Examples:
      exoctl models demo
      exoctl models add qwen3 ~/models/Qwen3-0.6B-4bit
      exoctl models add smollm2 SmolLM2-135M-Instruct.Q4_1.gguf
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
        print_json({"models": [model_json(m) for m in reply.models]})
    else:
        print_lines(render.models_lines(reply))


@models_group.command("add")
@click.argument("name")
@click.argument("source", metavar="SOURCE")
@click.option("--force", is_flag=True, help="Replace the model registered as NAME.")
@json_option
@socket_option
def models_add(*, name: str, source: str, force: bool, as_json: bool, socket: Path | None) -> None:
    """Register a model directory as NAME, or import a GGUF model as NAME.

    \b
    SOURCE is one of:
      DIR                 a model directory (config.json, safetensors): registered where it is
      FILE.gguf           a GGUF file, or a split set by its first part (-00001-of-0000N.gguf):
                          converted into an MLX model directory in exod's home
      ollama:MODEL[:TAG]  a model Ollama pulled (its store: OLLAMA_MODELS, else ~/.ollama/models,
                          else /usr/share/ollama/.ollama/models), with its stop words

    An import shows its progress and can be cancelled with Ctrl-C; a failed or cancelled one
    leaves nothing behind. NAME is 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit. A
    NAME already registered (to another directory, for DIR) is refused (64) unless --force.

    \b
    Examples:
      exoctl models add qwen3 ~/models/Qwen3-0.6B-4bit
      exoctl models add smollm2 ~/Downloads/SmolLM2-135M-Instruct.Q4_1.gguf
      exoctl models add llama3 ollama:llama3.2:1b
    """
    name = check_name(name)
    gguf = gguf_source(source)
    if gguf is not None:
        request = control_pb2.ImportRequest(
            name=name,
            path=str(gguf.path),
            force=force,
            stop=gguf.stop,
            source=gguf.source,
        )
        with connect(socket) as client:
            model = import_gguf(client, request, StatusLine(sys.stderr), as_json=as_json)
        if as_json:
            print_json({"type": "done", **model_json(model)})
        else:
            click.echo(f"imported {model.name} from {gguf.source}: {model.path}")
        return
    added = control_pb2.ModelsRequest(
        action=control_pb2.ModelsRequest.ADD,
        name=name,
        path=str(model_dir(source)),
        force=force,
    )
    with connect(socket) as client:
        model = _registered(client.models(added), name)
    if as_json:
        print_json(render.model_json(model))
    else:
        click.echo(f"added {model.name}: {model.path}")


@models_group.command("rm")
@click.argument("name")
@json_option
@socket_option
def models_rm(*, name: str, as_json: bool, socket: Path | None) -> None:
    """Forget the model NAME.

    A directory exod wrote (an imported GGUF, the demo model) is deleted with it; a directory
    registered with `models add NAME DIR` is left alone.
    """
    request = control_pb2.ModelsRequest(
        action=control_pb2.ModelsRequest.REMOVE, name=check_name(name)
    )
    with connect(socket) as client:
        reply = client.models(request)
    deleted = next((m.path for m in reply.models if m.name == name and m.owned), None)
    if as_json:
        print_json({"removed": name, "deleted": deleted})
    elif deleted:
        click.echo(f"removed {name} and deleted {deleted}")
    else:
        click.echo(f"removed {name}")


@models_group.command("demo")
@click.option("--name", default="demo", show_default=True, help="Register it under this name.")
@click.option("--force", is_flag=True, help="Replace NAME if it names another model.")
@json_option
@socket_option
def models_demo(*, name: str, force: bool, as_json: bool, socket: Path | None) -> None:
    """Have exod write a tiny model with random weights and register it.

    It loads in a moment and runs anywhere, to try exod out; being random, it writes gibberish.

    \b
    Example:
      exoctl models demo && exoctl run demo "Hello"
    """
    request = control_pb2.ModelsRequest(
        action=control_pb2.ModelsRequest.DEMO, name=check_name(name), force=force
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
