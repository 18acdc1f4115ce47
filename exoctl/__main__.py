"""Entry point of the `exoctl` console script and of `python -m exoctl`."""

from __future__ import annotations

# First, so that a Ctrl-C during the imports below already ends exoctl with one line and 130.
from exoctl import interrupt

interrupt.install()

from exoctl.cli import cli  # noqa: E402  # imported after the SIGINT handler is in place


def main() -> None:
    # ExoctlGroup.main always exits, with the code that docs/exit-codes.md lists.
    cli.main(prog_name="exoctl")


if __name__ == "__main__":
    main()
