"""Spine benchmarks, printed as ratios against a baseline measured in the same run.

1. Decode speed: tokens/s of `exoctl run` (through exod, gRPC and a runner subprocess) against
   in-process `mlx_lm.stream_generate` on the same generated model, prompt and token count.
2. CLI latency: wall time of `exoctl status` against `python -c "import grpc"`, the floor for any
   Python gRPC client.

Run: `.venv/bin/python bench/bench_spine.py` (add --quick for a fast smoke run). Nothing here is
asserted; record the figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exod.models.demo import write_demo_model

PROMPT = "The quick brown fox jumps over the lazy dog"


def baseline_tokens_per_s(model_dir: Path, max_tokens: int, repeats: int) -> float:
    """Decode tokens/s of mlx_lm.stream_generate in a fresh interpreter (model loaded once)."""
    code = f"""
import json, mlx_lm
model, tok = mlx_lm.load({str(model_dir)!r})
rates = []
for _ in range({repeats + 1}):
    last = None
    for r in mlx_lm.stream_generate(model, tok, {PROMPT!r}, max_tokens={max_tokens}):
        last = r
    rates.append(last.generation_tps)
print(json.dumps(rates[1:]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env)
    rates: list[float] = json.loads(out.stdout)
    return statistics.median(rates)


def exod_tokens_per_s(env: dict[str, str], max_tokens: int, repeats: int) -> tuple[float, float]:
    """(runner-reported tokens/s, client-observed tokens/s) through exoctl, median of runs."""
    reported, observed = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "exoctl",
                "run",
                "bench",
                PROMPT,
                "--raw",
                "--json",
                "--max-tokens",
                str(max_tokens),
            ],
            capture_output=True,
            check=True,
            env=env,
        )
        wall = time.perf_counter() - start
        done = json.loads(out.stdout.splitlines()[-1])
        if i == 0:
            continue  # the first run pays for spawning and loading the runner
        reported.append(done["tokens_per_s"])
        observed.append(done["generation_tokens"] / wall)
    return statistics.median(reported), statistics.median(observed)


def wall(cmd: list[str], env: dict[str, str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    args = parser.parse_args()
    max_tokens, repeats = (64, 2) if args.quick else (256, 5)

    work = Path(tempfile.mkdtemp(prefix="exob"))
    model = write_demo_model(
        work / "model", hidden_size=512, num_layers=8, intermediate_size=1408, vocab_size=1024
    )
    env = {
        **os.environ,
        "EXOD_HOME": str(work / "home"),
        "EXOD_SOCKET": str(work / "s.sock"),
        "EXOD_HTTP_PORT": "0",  # off: a real exod may hold the default port on this machine
    }
    daemon = subprocess.Popen(
        [sys.executable, "-m", "exod"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            if (work / "s.sock").exists():
                break
            time.sleep(0.1)
        subprocess.run(
            [sys.executable, "-m", "exoctl", "models", "add", "bench", str(model)],
            check=True,
            env=env,
            capture_output=True,
        )
        base = baseline_tokens_per_s(model, max_tokens, repeats)
        reported, observed = exod_tokens_per_s(env, max_tokens, repeats)
        status = wall([sys.executable, "-m", "exoctl", "status"], env, 10)
        grpc_import = wall([sys.executable, "-c", "import grpc"], env, 10)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)

    rows = [
        ("decode: mlx_lm.stream_generate, in-process (baseline)", base, "tok/s", 1.0),
        ("decode: exoctl run, as the runner measures it", reported, "tok/s", reported / base),
        ("decode: exoctl run, client wall time incl. prefill", observed, "tok/s", observed / base),
        ("cli: python -c 'import grpc' (baseline)", grpc_import * 1000, "ms", 1.0),
        ("cli: exoctl status", status * 1000, "ms", status / grpc_import),
    ]
    print(f"model: demo qwen2, hidden 512, 8 layers; {max_tokens} tokens; median of {repeats}")
    for label, value, unit, ratio in rows:
        print(f"{label:<55} {value:9.1f} {unit:<6} ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
