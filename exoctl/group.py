"""How exoctl ends: the top-level click group that owns every command's exit code.

Every way out goes through ExoctlGroup.main, which turns each failure into one line on stderr and
an exit code from sysexits.h (docs/exit-codes.md): click's usage errors become 64 rather than
click's 2, a bug becomes 70 rather than a traceback and 1, and a reader that closes stdout ends
the command quietly with 0.
"""

from __future__ import annotations

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
