"""`exod`: the daemon's command line. Every flag comes from exod/config.py's table."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence

from exod import __version__, config
from exod.errors import Exit

# argparse's words for a flag given last, without its value.
_NO_VALUE = re.compile(r"argument (--[a-z-]+): expected one argument")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # argparse's is NoReturn too
        # A bad flag is a configuration mistake: 78, so a service manager does not restart-loop.
        no_value = _NO_VALUE.fullmatch(message)
        if no_value:
            message = f"{no_value.group(1)} needs a value"
        self.exit(int(Exit.CONFIG), f"exod: {message} (see exod --help)\n")


def unknown_argument(extra: Sequence[str], known: Sequence[str]) -> str:
    """The one-line refusal of arguments argparse did not take, with the nearest option if any."""
    options = [a for a in extra if a.startswith("-")]
    if not options:
        return f"unexpected argument {extra[0]!r}: exod takes only options"
    name = options[0].partition("=")[0]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown option {name}{hint}"


def parser() -> argparse.ArgumentParser:
    rows = config.describe()
    width = max(len(env) for _, env, _, _ in rows)
    epilog = "settings (flag, environment variable, default):\n" + "\n".join(
        f"  {env:<{width}}  {flag}\n  {'':<{width}}  {help_}. default: {default}"
        for flag, env, default, help_ in rows
    )
    p = _Parser(
        prog="exod",
        description="The exod daemon: serves models to exoctl over a Unix socket. "
        "It runs in the foreground; `exoctl service install` makes it a login service.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # `--idle-tt 5` must not quietly mean --idle-ttl: a unit file written today would change
        # meaning the day another option starting the same way is added.
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=f"exod {__version__}")
    for s in config.SETTINGS:
        p.add_argument(s.flag, dest=s.name, metavar=s.env, help=f"{s.help} (env {s.env})")
    return p


def parse(argv: Sequence[str] | None) -> dict[str, str | None]:
    """The flags given, by setting name; exits 78 with one line on anything else."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        known = ["--help", "--version", *(s.flag for s in config.SETTINGS)]
        p.error(unknown_argument(extra, known))
    flags: dict[str, str | None] = vars(args)
    return flags


def main(argv: Sequence[str] | None = None) -> None:
    flags = parse(argv)
    try:
        settings = config.load(flags)
    except config.ConfigError as e:
        print(f"exod: {e}", file=sys.stderr)
        sys.exit(int(Exit.CONFIG))
    from exod import daemon  # after parsing, so `exod --help` stays instant

    sys.exit(daemon.run(settings))


if __name__ == "__main__":
    main()
