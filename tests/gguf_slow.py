"""EXOD_RUNNER_WRAPPER for the import tests: the converter it wraps, slowed down.

exod starts `[WRAPPER...] python -m exod.models.gguf SRC DEST` under the shim; with
EXOD_RUNNER_WRAPPER="python tests/gguf_slow.py" this runs that converter in-process with a pause
of SLOW_S before each tensor, so that a test can act while a conversion is under way (it still
reports progress within each pause's neighbourhood: a tiny model's import takes a few seconds).
"""

from __future__ import annotations

import sys
import time
from typing import Any

SLOW_S = 0.25


def main(argv: list[str]) -> int:
    if argv[1:3] != ["-m", "exod.models.gguf"]:
        print(f"gguf_slow.py: not the converter: {argv}", file=sys.stderr)
        return 64
    from exod.models.gguf import __main__ as entry
    from exod.models.gguf import convert

    original = convert._convert_tensor

    def slow(*args: Any, **kwargs: Any) -> None:
        time.sleep(SLOW_S)
        original(*args, **kwargs)

    convert._convert_tensor = slow
    return entry.main(argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
