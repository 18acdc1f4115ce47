"""How exoctl ends: the top-level click group that owns every command's exit code.

Every way out goes through ExoctlGroup.main, which turns each failure into one line on stderr and
an exit code from sysexits.h (docs/exit-codes.md): click's usage errors become 64 rather than
click's 2, a bug becomes 70 rather than a traceback and 1, and a reader that closes stdout ends
the command quietly with 0.

An option given on the wrong side of a command's name (`exoctl --json status`, `exoctl status
--version`) is answered with the command line that works, rather than click's "No such option".
"""

from __future__ import annotations

import importlib
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from exoctl.failures import Failure, one_line
from exoctl.terminal import say, silence_stdout
from exod.errors import Exit


def _usage_line(e: click.UsageError) -> str:
    command = e.ctx.command_path if e.ctx is not None else "exoctl"
    return one_line(e.format_message(), f"see `{command} --help`")


def _internal_line(e: Exception) -> str:
    import traceback

    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return one_line(f"internal error in exoctl: {type(e).__name__}: {e}{at}", "please report it")


def _option(command: click.Command, name: str) -> click.Option | None:
    """The option of `command` that `name` (e.g. `--json`, `-f`) spells, if it has one."""
    for param in command.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def _takes_value(option: click.Option) -> bool:
    return not option.is_flag and not option.count


def _command_of(
    group: click.Group, ctx: click.Context, words: Sequence[str]
) -> tuple[list[str], click.Command]:
    """The command names among `words`, in order, and the command they lead to."""
    path: list[str] = []
    command: click.Command = group
    for word in words:
        sub = command.get_command(ctx, word) if isinstance(command, click.Group) else None
        if sub is not None:
            path.append(word)
            command = sub
    return path, command


def misplaced_option(group: click.Group, ctx: click.Context, name: str, args: Sequence[str]) -> str:
    """Advice for a command's option given before the command's name (`exoctl --json status`);
    "" when no command takes it (click's own message is then the better one)."""
    words = list(args)
    at = next((i for i, w in enumerate(words) if w == name or w.startswith(f"{name}=")), None)
    if at is None:
        return ""  # given in a form not looked for (`-xf`): click's message will do
    moved = [words.pop(at)]
    path, command = _command_of(group, ctx, words)
    option = _option(command, name) if path else None
    if option is not None and _takes_value(option) and moved == [name] and at < len(words):
        # `--socket PATH status`: PATH is the option's value, whatever it looks like.
        moved.append(words.pop(at))
        path, command = _command_of(group, ctx, words)
        option = _option(command, name) if path else None
    if option is None:
        return "" if path else _some_command_takes(group, ctx, name)
    # Right after the command's name is always a place for its options, whatever follows.
    last = max(i for i, w in enumerate(words) if w in path)
    fixed = [*words[: last + 1], *moved, *words[last + 1 :]]
    example = f"{ctx.command_path} {shlex.join(fixed)}"
    return one_line(f"{name} goes after the command", f"try `{example}`")


def _some_command_takes(group: click.Group, ctx: click.Context, name: str) -> str:
    """Advice for a command's option given with no command (`exoctl --json`), naming the first
    command that takes it; "" when none does."""
    for word in group.list_commands(ctx):
        command = group.get_command(ctx, word)
        option = None if command is None else _option(command, name)
        if option is not None:
            value = f" {option.metavar or 'VALUE'}" if _takes_value(option) else ""
            example = f"{ctx.command_path} {word} {name}{value}"
            return one_line(f"{name} goes after a command's name", f"e.g. `{example}`")
    return ""


def _root_option_line(root: click.Group, e: click.NoSuchOption) -> str:
    """Advice for exoctl's own option given after a command (`exoctl status --version`); "" when
    `e` is about another option."""
    if e.ctx is None or e.ctx.parent is None or _option(root, e.option_name) is None:
        return ""
    program = e.ctx.find_root().command_path
    what = f"{e.option_name} is an option of {program} itself, not of {e.ctx.info_name}"
    return one_line(what, f"try `{program} {e.option_name}`")


class Group(click.Group):
    """A group of commands that says where an option of one of them goes when it is given before
    the command's name."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)  # click's parser consumes the list it is given
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            advice = misplaced_option(self, ctx, e.option_name, given)
            if not advice:
                raise
            raise Failure(Exit.USAGE, advice) from None


class ExoctlGroup(Group):
    """The top-level group; it owns the exit code of every command.

    Commands of their own module (`models`, `service`) are imported only when named: `exoctl
    status` must not pay for the service manager's plans (docs/benchmarks.md, CLI start-up).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, str] = {}

    def add_lazy_command(self, name: str, target: str) -> None:
        """Add the command `module:attribute`, imported on first use."""
        self._lazy[name] = target

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self._lazy.get(cmd_name)
        if target is not None and cmd_name not in self.commands:
            module, attribute = target.split(":")
            command = getattr(importlib.import_module(module), attribute)
            assert isinstance(command, click.Command), target
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.NoSuchCommand as e:
            # click suggests among the commands imported so far; the lazy ones count too.
            names = self.list_commands(ctx)
            raise click.NoSuchCommand(e.command_name, possibilities=names, ctx=ctx) from None

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
        except click.NoSuchOption as e:
            say(_root_option_line(self, e) or _usage_line(e))
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
