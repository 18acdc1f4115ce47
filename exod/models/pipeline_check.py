"""Whether mlx-lm can split a model's layers over ranks: asked of mlx-lm, not of a list of names.

`python -m exod.models.pipeline_check PATH` builds the model mlx-lm would build for the config
(its arrays stay lazy: no weight is read and nothing is computed) and prints one JSON object:
{"model_type": ..., "pipeline": true|false}, with "error" when mlx-lm cannot build it. A model
can be split when its inner model has `pipeline` (mlx_lm.models.pipeline.PipelineMixin), the test
that mlx-lm's own sharded_load makes.

exod asks in a short subprocess (PipelineCheck), never in its own process: importing mlx_lm
takes seconds and memory that the daemon has no use for. Answers are kept per (path, content
hash), so a model is asked about once while its files stay the same.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from exod.errors import ExoError

# Importing mlx_lm and building a large model's lazy modules takes a few seconds; a check that
# takes this long is stuck.
CHECK_TIMEOUT_S = 60.0


def check(path: Path) -> dict[str, object]:
    """What mlx-lm says of the model in `path`: its model_type and whether it can be split."""
    from mlx_lm.utils import _get_classes  # private, but the one lookup load_model uses

    from exod.models.inspect import read_config

    config = read_config(path)
    model_type = str(config.get("model_type") or "")
    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
    except Exception as e:  # mlx-lm cannot build it: it cannot load, let alone split, it
        return {"model_type": model_type, "pipeline": False, "error": f"{type(e).__name__}: {e}"}
    inner = getattr(model, "model", None)
    return {"model_type": model_type, "pipeline": inner is not None and hasattr(inner, "pipeline")}


class PipelineCheck:
    """exod's side: ask in a subprocess, off the event loop, once per model content."""

    def __init__(self, timeout: float = CHECK_TIMEOUT_S) -> None:
        self._timeout = timeout
        self._known: dict[tuple[str, str], bool] = {}

    async def supports(self, path: Path, content_hash: str) -> bool:
        key = (str(path), content_hash)
        if key not in self._known:
            self._known[key] = await self._ask(path)
        return self._known[key]

    async def _ask(self, path: Path) -> bool:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "exod.models.pipeline_check",
            str(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ExoError(
                "internal",
                f"asking mlx-lm whether {path} can be split took over {self._timeout:g}s: "
                "retry; exod's log may say more",
            ) from None
        finally:
            if proc.returncode is None:  # cancelled: leave no process behind
                proc.kill()
                await proc.wait()
        try:
            answer = json.loads(out)
            return bool(answer["pipeline"])
        except (ValueError, KeyError, TypeError):
            last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise ExoError(
                "internal",
                f"could not ask mlx-lm whether {path} can be split "
                f"(exit {proc.returncode}: {last}): check that mlx-lm is installed with exod",
            ) from None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m exod.models.pipeline_check MODEL_DIR", file=sys.stderr)
        return 64
    try:
        answer = check(Path(argv[0]))
    except ExoError as e:
        print(e.message, file=sys.stderr)
        return 65
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
