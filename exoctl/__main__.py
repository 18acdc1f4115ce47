"""Entry point of the `exoctl` console script and of `python -m exoctl`."""

from __future__ import annotations

from exoctl.cli import cli


def main() -> None:
    # ExoctlGroup.main always exits, with the code that docs/exit-codes.md lists.
    cli.main(prog_name="exoctl")


if __name__ == "__main__":
    main()
