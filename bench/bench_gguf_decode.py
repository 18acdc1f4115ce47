"""Decode speed of an imported GGUF: SmolLM2's Q4_1 import against the same model in float16.

SmolLM2-135M-Instruct's Q4_1 GGUF (tools/smollm2.py; run `.venv/bin/python tools/smollm2.py`
once to cache it) is converted by `python -m exod.models.gguf`, the subprocess exod runs. The
baseline is the same imported model with every quantized layer dequantized to float16 by mlx-lm
(`dequantize_model`: the values the quantized layers stand for, as float16 matrices) and saved
as a second model directory; the norms, float32 in the GGUF, are left as they are in both. Both
are loaded in one interpreter and decoded with `mlx_lm.stream_generate`, same prompt, greedy,
the same fixed number of tokens (end-of-sequence ignored, so every run decodes all of them),
alternating between the two so that whatever else the machine does falls on both alike; one
warm-up run each, then the median of --repeats. Nothing is asserted; record the figures in
docs/benchmarks.md.

Run: `.venv/bin/python bench/bench_gguf_decode.py` (--tokens, --repeats; --quick for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load, stream_generate
from mlx_lm.utils import dequantize_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tools/ is not a package

from tools.smollm2 import cached_path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"
MIB = 1024 * 1024


@dataclass
class Variant:
    label: str
    model: Any  # mlx_lm is untyped: an nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    weight_bytes: int
    decode: list[float] = field(default_factory=list)  # tokens/s, one per timed run
    prefill: list[float] = field(default_factory=list)
    text: str = ""


def import_gguf(src: Path, dest: Path) -> None:
    """`python -m exod.models.gguf src dest`, as exod runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "exod.models.gguf", str(src), str(dest)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"import of {src} failed ({proc.returncode}): {proc.stderr.strip()}")


def write_dense(imported: Path, dest: Path, dtype: mx.Dtype) -> None:
    """The imported model with its quantized layers dequantized, and every floating-point
    parameter (the norms too, float32 in the GGUF) in dtype, as a model directory."""
    loaded: Any = load(str(imported))
    model = loaded[0]
    dequantize_model(model)
    model.update(
        tree_map(
            lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )
    save_model(dest, model)
    config = json.loads((imported / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in imported.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, dest / path.name)


def load_variant(label: str, path: Path) -> Variant:
    loaded: Any = load(str(path))
    model, tokenizer = loaded[0], loaded[1]
    # A fixed token count: never stop at end-of-sequence.
    tokenizer.eos_token_ids = set()
    params: dict[str, mx.array] = {}
    tree_flatten(model.parameters(), destination=params)
    nbytes = sum(v.nbytes for v in params.values())
    return Variant(label, model, tokenizer, nbytes)


def run_once(v: Variant, prompt: str, tokens: int) -> tuple[float, float, str]:
    last = None
    pieces = []
    for response in stream_generate(v.model, v.tokenizer, prompt, max_tokens=tokens):
        last = response
        pieces.append(response.text)
    if last is None or last.generation_tokens != tokens:
        got = 0 if last is None else last.generation_tokens
        raise SystemExit(f"{v.label}: decoded {got} tokens, not {tokens}")
    return last.generation_tps, last.prompt_tps, "".join(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model")
    parser.add_argument("--quick", action="store_true", help="32 tokens, 2 repeats")
    args = parser.parse_args()
    tokens, repeats = (32, 2) if args.quick else (args.tokens, args.repeats)
    src = cached_path()
    if src is None:
        raise SystemExit(
            "the SmolLM2 GGUF is not cached: run `.venv/bin/python tools/smollm2.py` first"
        )
    with tempfile.TemporaryDirectory(prefix="bench-gguf-decode-") as tmp:
        imported = Path(tmp) / "q4_1"
        import_gguf(src, imported)
        dense_dirs = {"float16": mx.float16, "float32": mx.float32}
        if args.quick:
            del dense_dirs["float32"]
        for name, dtype in dense_dirs.items():
            write_dense(imported, Path(tmp) / name, dtype)
        variants = [load_variant(f"dequantized {name}", Path(tmp) / name) for name in dense_dirs]
        variants.append(load_variant("imported Q4_1 (+Q8_0)", imported))
        prompt: str = variants[0].tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
        )
        for v in variants:
            *_, v.text = run_once(v, prompt, tokens)  # warm-up: kernels, caches
        for _ in range(repeats):
            for v in variants:
                decode, prefill, _ = run_once(v, prompt, tokens)
                v.decode.append(decode)
                v.prefill.append(prefill)
    base = variants[0]
    print(
        f"mlx {version('mlx')}, mlx-lm {version('mlx-lm')} on {mx.default_device()}; "
        f"{tokens} tokens, median of {repeats}; prompt {PROMPT!r} (chat template)"
    )
    print(
        f"{'model':<24}{'weights MiB':>12}{'decode tok/s':>14}{'(min-max)':>16}"
        f"{'ratio':>8}{'prefill tok/s':>15}{'same text':>11}"
    )
    for v in variants:
        rate = statistics.median(v.decode)
        same = next(
            (i for i, (a, b) in enumerate(zip(v.text, base.text, strict=False)) if a != b),
            min(len(v.text), len(base.text)),
        )
        print(
            f"{v.label:<24}{v.weight_bytes / MIB:>12.1f}{rate:>14.1f}"
            f"{f'({min(v.decode):.1f}-{max(v.decode):.1f})':>16}"
            f"{rate / statistics.median(base.decode):>8.3f}"
            f"{statistics.median(v.prefill):>15.1f}{same:>11}"
        )
    print("same text: characters of the greedy text equal to the float16 model's, from the start")
    for v in variants:
        print(f"{v.label}: {v.text[:120]!r}")


if __name__ == "__main__":
    main()
