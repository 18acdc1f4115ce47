"""GGUF import benchmark: time and peak memory of a conversion against the size of the file.

For each of three paths through the converter (Q4_0: exact repack; Q4_K: decoded by gguf.quants
and re-quantized; F16: copied) a llama GGUF of each --size-mb is written (random weights, the
demo tokenizer), then converted by `python -m exod.models.gguf`, the subprocess exod runs, and
its peak resident memory (the kernel's ru_maxrss for that process) is set against the file's
size. The baseline is the same subprocess converting a tiny GGUF: the interpreter, numpy, gguf
and tokenizers, before any weights. The cached SmolLM2 GGUF (tools/smollm2.py) is measured too
when it is there, both converted and with its header read and its tokenizer rebuilt alone (no
weights), which is the part of its peak that comes from its 49k-token vocabulary.

The conversion reads tensor data with plain reads a chunk of rows at a time, so the peak should
stay near the baseline plus a few chunks, whatever the file's size: the ratio (peak - baseline)
/ file falls as files grow. "net MiB/s" leaves out the baseline's time (starting Python and its
imports). Nothing is asserted; record the figures in docs/benchmarks.md.

Run: `.venv/bin/python bench/bench_gguf.py` (--size-mb 300 1200 by default; --quick for Q4_0 at
the first size only).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' helpers

from exod.models import demo
from tests.gguf_files import add_value, metadata, random_blocks, write_tiny_gguf
from tools.smollm2 import cached_path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 8192, 16, 4, 1024


@dataclass
class Result:
    label: str
    file_bytes: int
    seconds: float
    peak_bytes: int
    converted: bool = True  # False: the header and tokenizer only, so no MiB/s


def write_big_gguf(path: Path, kind: T, size_mb: int) -> Path:
    """A llama GGUF of about size_mb: layers of HIDDEN x INTER, random weights of kind."""
    tokenizer = demo.train_tokenizer(VOCAB)
    config = demo.model_config(
        "llama",
        hidden_size=HIDDEN,
        num_layers=1,
        intermediate_size=INTER,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.get_vocab()[demo.IM_END],
    )
    config["num_attention_heads"], config["num_key_value_heads"] = HEADS, KV_HEADS
    head_dim = HIDDEN // HEADS
    matrices = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (KV_HEADS * head_dim, HIDDEN),
        "attn_v": (KV_HEADS * head_dim, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (INTER, HIDDEN),
        "ffn_up": (INTER, HIDDEN),
        "ffn_down": (HIDDEN, INTER),
    }
    per_layer = sum(r * c for r, c in matrices.values()) * _bytes_per_value(kind)
    layers = max(1, round(size_mb * MIB / per_layer))
    config["num_hidden_layers"] = layers
    writer = GGUFWriter(path, "llama", use_temp_file=True)
    for key, value in metadata("llama", config, tokenizer).items():
        if key != "general.architecture":
            add_value(writer, key, value)
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, int], kind: T) -> None:
        if kind == T.F16:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, random_blocks(shape, kind, rng), raw_dtype=kind)

    add("token_embd.weight", (VOCAB, HIDDEN), kind)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for layer in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(HIDDEN, dtype=np.float32))
        for name, shape in matrices.items():
            add(f"blk.{layer}.{name}.weight", shape, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bytes_per_value(kind: T) -> float:
    return {T.F16: 2.0, T.Q4_0: 18 / 32, T.Q4_K: 144 / 256}[kind]


# Runs its arguments as a command and prints its exit code and peak RSS (ru_maxrss).
LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n"
)


# The conversion's fixed part alone: the header parsed and the tokenizer rebuilt, no weights.
HEADER_ONLY = (
    "import sys\n"
    "from pathlib import Path\n"
    "from exod.models.gguf.reader import open_gguf\n"
    "from exod.models.gguf.tokenizer import tokenizer_files\n"
    "tokenizer_files(open_gguf(Path(sys.argv[1])).meta)\n"
)


def convert_measured(src: Path, dest: Path) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of `python -m exod.models.gguf src dest`."""
    return measured(["-m", "exod.models.gguf", str(src), str(dest)], f"conversion of {src}")


def header_measured(src: Path) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of reading src's header and rebuilding its tokenizer."""
    return measured(["-c", HEADER_ONLY, str(src)], f"reading the header of {src}")


def measured(args: list[str], what: str) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of `python ARGS`.

    Started by a small launcher process, not by this one: Linux carries a process's peak RSS
    across exec, and a child forked from this process (which has just held a whole GGUF in
    memory to write it) would start with this process's peak.
    """
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    seconds = time.monotonic() - start
    code, peak = (int(v) for v in proc.stdout.split())
    if code != 0:
        raise SystemExit(f"{what} failed ({code}): {proc.stderr.strip()}")
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return seconds, peak if sys.platform == "darwin" else peak * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-mb",
        type=int,
        nargs="+",
        default=[300, 1200],
        help="sizes of the GGUF files written, one of each type per size (default: 300 1200)",
    )
    parser.add_argument("--quick", action="store_true", help="Q4_0 only, at the first size")
    args = parser.parse_args()
    kinds = [T.Q4_0] if args.quick else [T.Q4_0, T.Q4_K, T.F16]
    sizes: list[int] = args.size_mb[:1] if args.quick else args.size_mb
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = Path(tmp)
        tiny = write_tiny_gguf(work / "tiny.gguf", weight_type=T.Q4_0)
        base_seconds, baseline = convert_measured(tiny.path, work / "tiny")
        results.append(Result("tiny (baseline)", tiny.path.stat().st_size, base_seconds, baseline))
        real = cached_path()
        if real is not None:
            seconds, peak = header_measured(real)
            header = Result("SmolLM2 header+tokenizer", real.stat().st_size, seconds, peak, False)
            results.append(header)
            seconds, peak = convert_measured(real, work / "smollm2")
            results.append(Result("SmolLM2 Q4_1 + Q8_0", real.stat().st_size, seconds, peak))
        for kind in kinds:
            for size_mb in sizes:
                src = write_big_gguf(work / f"{kind.name}.gguf", kind, size_mb)
                dest = work / f"{kind.name}-{size_mb}"
                seconds, peak = convert_measured(src, dest)
                results.append(Result(f"random {kind.name}", src.stat().st_size, seconds, peak))
                src.unlink()
                shutil.rmtree(dest)
    print(
        f"{'file':<26}{'size MiB':>10}{'time s':>9}{'MiB/s':>8}{'net MiB/s':>11}{'peak MiB':>10}"
        f"{'peak/size':>11}{'(peak-base)/size':>18}"
    )
    for r in results:
        size = r.file_bytes / MIB
        net = r.seconds - base_seconds  # less starting the interpreter and its imports
        rate, net_rate = (
            (f"{size / r.seconds:.0f}", f"{size / net:.0f}")
            if r.converted and net > 0
            else ("-", "-")
        )
        print(
            f"{r.label:<26}{size:>10.1f}{r.seconds:>9.2f}{rate:>8}{net_rate:>11}"
            f"{r.peak_bytes / MIB:>10.0f}{r.peak_bytes / r.file_bytes:>11.2f}"
            f"{(r.peak_bytes - baseline) / r.file_bytes:>18.3f}"
        )


if __name__ == "__main__":
    main()
