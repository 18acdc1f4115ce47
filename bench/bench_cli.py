"""CLI start-up: wall time of `exoctl status` against `python -c "import grpc"`.

`import grpc` is the floor of any Python gRPC client; `exoctl status` adds click, the generated
stubs, one RPC to a real exod (no runner) and printing. The two are run interleaved, so that a
busy machine slows both alike, and the medians compared. Target (issue 10): ratio <= 1.6.

Run: `.venv/bin/python bench/bench_cli.py [--repeats N]`. Nothing here is asserted; record the
figures in docs/benchmarks.md. `--importtime` also prints the modules `exoctl status` imports
that take the longest (from `python -X importtime`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def exoctl_command() -> list[str]:
    """The console script that users run, beside this interpreter; `-m exoctl` without it."""
    script = Path(sys.executable).parent / "exoctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "exoctl"]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, env=env)
    return time.perf_counter() - start


def slowest_imports(env: dict[str, str], count: int = 15) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the top-level imports of `exoctl status`."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "exoctl", "status"],
        capture_output=True,
        check=True,
        env=env,
        text=True,
    )
    rows = []
    for line in out.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:count]


def start_exod(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    skip = ("EXOD_", "PYTHONDONTWRITEBYTECODE")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(skip)},
        # An installed exoctl runs from bytecode (pip compiles it); a checkout run with
        # PYTHONDONTWRITEBYTECODE would compile every module of it at each start instead.
        "PYTHONPYCACHEPREFIX": str(work / "pycache"),
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
    subprocess.run(
        [sys.executable, "-m", "exoctl", "status", "--wait", "60"],
        check=True,
        env=env,
        capture_output=True,
    )
    return daemon, env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="exoc"))
    daemon, env = start_exod(work)
    exoctl = exoctl_command()
    status, grpc_import, help_ = [], [], []
    try:
        timed([*exoctl, "status", "--help"], env)  # writes the bytecode
        for _ in range(args.repeats):
            grpc_import.append(timed([sys.executable, "-c", "import grpc"], env))
            status.append(timed([*exoctl, "status"], env))
            help_.append(timed([*exoctl, "status", "--help"], env))
        slowest = slowest_imports(env) if args.importtime else []
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(grpc_import)
    print(f"{' '.join(exoctl)}: interleaved runs, median of {args.repeats} (min in brackets)")
    for label, times in [
        ("python -c 'import grpc' (baseline)", grpc_import),
        ("exoctl status --help", help_),
        ("exoctl status (one RPC to exod, no runners)", status),
    ]:
        med = statistics.median(times)
        print(
            f"{label:<46} {med * 1000:7.1f} ms ({min(times) * 1000:6.1f})  ratio {med / base:.3f}"
        )
    for micros, module in slowest:
        print(f"  import {module.strip():<40} {micros / 1000:7.1f} ms (cumulative)")


if __name__ == "__main__":
    main()
