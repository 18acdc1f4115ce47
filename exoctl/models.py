"""`exoctl models`: the registry of names that `exoctl run NAME` accepts."""

from __future__ import annotations

from pathlib import Path

import click

from exoctl import render
from exoctl.arguments import check_name, model_dir
from exoctl.failures import Failure, one_line
from exoctl.group import Group
from exoctl.options import connect, json_option, socket_option
from exoctl.terminal import print_json, print_lines
from exod.errors import Exit
from exod.proto.exo.v1 import control_pb2


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
@click.option("--force", is_flag=True, help="Replace NAME if it names another directory.")
@json_option
@socket_option
def models_add(
    *, name: str, directory: str, force: bool, as_json: bool, socket: Path | None
) -> None:
    """Register the model in DIR as NAME.

    Then `exoctl run NAME` runs it. NAME is 1 to 64 of a-z 0-9 . _ -, starting with a letter or
    digit. DIR must exist; it is recorded as an absolute path. A NAME already registered to
    another directory is refused (64) unless --force.
    """
    request = control_pb2.ModelsRequest(
        action=control_pb2.ModelsRequest.ADD,
        name=check_name(name),
        path=str(model_dir(directory)),
        force=force,
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
