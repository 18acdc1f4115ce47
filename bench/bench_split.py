"""A model split over 2 and 3 members against the same model whole on one, decode tokens/s.

Three real exods on loopback (A on 127.0.0.2, B on .3, C on .4), one cluster. A generated qwen2
model (random weights, big enough that decoding is work: `--hidden`, `--layers`) runs three ways
in the same run: whole on A, split over A and B (`exoctl run --on A,B`), and over A, B and C.
Each way first loads (one short run, not counted), then runs `--repeats` greedy generations of
`--tokens` tokens; the figure is the median of `tokens_per_s` from `exoctl run --json`'s done
line (decode only: exod measures from the first token). The split's instance is ended
(`exoctl kill i-…`) before the next way, since a node runs one split model at a time.

All the ranks share this machine's cores, and the ring runs over loopback: the ratio shows what
splitting costs in coordination (one ring hop per layer boundary per token, lockstep sharing),
not what two machines gain in memory. Run: `.venv/bin/python bench/bench_split.py`. Nothing is
asserted; record the figures in docs/benchmarks.md. Every exod started here is ended by its pid.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ beside exod/
from bench.node import BenchNode  # after the path above
from exod.models.demo import write_demo_model

PROMPT = "Once upon a time"


def run(node: BenchNode, model: Path, tokens: int, on: list[str]) -> dict[str, Any]:
    args = ["run", str(model), PROMPT, "--raw", "--json", "--max-tokens", str(tokens)]
    if on:
        args += ["--on", ",".join(on)]
    lines = [json.loads(line) for line in node.exoctl(*args).splitlines() if line.strip()]
    done: dict[str, Any] = lines[-1]
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="exod-bench-split-"))
    nodes = [
        BenchNode(work, name, address, EXOD_PEER_TIMEOUT="5")
        for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4"))
    ]
    a, b, c = nodes
    try:
        model = write_demo_model(
            work / "model",
            hidden_size=args.hidden,
            num_layers=args.layers,
            intermediate_size=args.hidden * 3,
        )
        for node in nodes:
            node.start()
        a.exoctl("cluster", "init")
        for node in (b, c):
            node.exoctl("cluster", "join", a.exoctl("cluster", "invite").strip())
        ids = [json.loads(n.exoctl("status", "--json"))["node_id"] for n in nodes]
        ways = {"1 node": [], "2 nodes": ids[:2], "3 nodes": ids}
        figures: dict[str, float] = {}
        for way, on in ways.items():
            first = run(a, model, 8, on)  # loads (and for a split, pushes the weights)
            rates = [run(a, model, args.tokens, on)["tokens_per_s"] for _ in range(args.repeats)]
            figures[way] = statistics.median(rates)
            print(
                f"{way}: {figures[way]:.1f} tokens/s (runs: {', '.join(f'{r:.1f}' for r in rates)})"
            )
            if first.get("instance"):
                a.exoctl("kill", first["instance"])
            else:
                a.exoctl("kill", "--all")
        base = figures["1 node"]
        print(
            json.dumps(
                {
                    "model": {"hidden": args.hidden, "layers": args.layers},
                    "tokens": args.tokens,
                    "tokens_per_s": figures,
                    "ratio_to_1_node": {k: round(v / base, 3) for k, v in figures.items()},
                }
            )
        )
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
