"""`exod`: the daemon's command line. Every flag comes from exod/config.py's table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from exod import __version__, config
from exod.errors import Exit


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # argparse's is NoReturn too
        # A bad flag is a configuration mistake: 78, so a service manager does not restart-loop.
        self.exit(int(Exit.CONFIG), f"exod: {message} (see exod --help)\n")


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
    )
    p.add_argument("--version", action="version", version=f"exod {__version__}")
    for s in config.SETTINGS:
        p.add_argument(s.flag, dest=s.name, metavar=s.env, help=f"{s.help} (env {s.env})")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings = config.load(vars(args))
    except config.ConfigError as e:
        print(f"exod: {e}", file=sys.stderr)
        sys.exit(int(Exit.CONFIG))
    from exod import daemon  # after parsing, so `exod --help` stays instant

    sys.exit(daemon.run(settings))


if __name__ == "__main__":
    main()
