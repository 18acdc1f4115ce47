"""The quick start's main job: exod up on a private home, a real model imported, one answer.

Run it through `./dev demo [PROMPT]`. It starts a real exod in the foreground of this script (on a
temporary home, so it never disturbs an exod you already run), fetches SmolLM2-135M-Instruct's
GGUF once (tools/smollm2.py: 93 MB, pinned by sha256, kept in .cache/smollm2/), imports it with
`exoctl models add smollm2 FILE.gguf`, asks it a question through `exoctl run`, shows `exoctl
status`, and stops exod again with SIGTERM, leaving nothing running.

The import runs every time (about five seconds): it is half of what the demo shows, and the home
is new each time anyway. Offline (tools/smollm2.py exits 69), or when the GGUF cannot be had for
another reason, the demo says so and falls back to the tiny random-weight demo model, which
writes gibberish by design.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"
UNAVAILABLE = 69  # tools/smollm2.py: pip could not fetch the wheel (offline)


def main() -> int:
    prompt = " ".join(sys.argv[1:]) or QUESTION
    home = Path(tempfile.mkdtemp(prefix="exod-demo-"))
    sock = home / "exod.sock"
    # The HTTP API stays off: a real exod may hold its port on this machine.
    env = {**os.environ, "EXOD_HOME": str(home), "EXOD_SOCKET": str(sock), "EXOD_HTTP_PORT": "0"}
    gguf = smollm2()
    log = open(home / "exod.log", "wb")  # noqa: SIM115  # exod writes it while we run
    print(f"demo: starting exod (home {home})", file=sys.stderr)
    daemon = subprocess.Popen([sys.executable, "-m", "exod"], env=env, stdout=log, stderr=log)
    try:
        if not wait_for(sock, daemon):
            print((home / "exod.log").read_text(), file=sys.stderr)
            return 1
        if gguf is not None:
            steps = [
                ["models", "add", "smollm2", str(gguf)],
                ["run", "smollm2", prompt, "--max-tokens", "64"],
                ["status"],
            ]
        else:
            steps = [
                ["models", "demo"],
                ["run", "demo", prompt, "--max-tokens", "48"],
                ["status"],
            ]
        for args in steps:
            print(f"\n$ exoctl {shlex.join(args)}", file=sys.stderr, flush=True)
            code = subprocess.run(
                [sys.executable, "-m", "exoctl", *args], env=env, check=False
            ).returncode
            if code != 0:
                print(
                    f"demo: exoctl exited {code}; exod's log: {home / 'exod.log'}", file=sys.stderr
                )
                return code
        if gguf is not None:
            print(
                "\ndemo: that was SmolLM2-135M-Instruct, imported from its GGUF file; import yours"
                " with `exoctl models add NAME FILE.gguf` or `exoctl models add NAME"
                " ollama:MODEL`, or register an MLX model directory with `exoctl models add NAME"
                " DIR`.",
                file=sys.stderr,
            )
        else:
            print(
                "\ndemo: the demo model has random weights, so its text is gibberish by design;"
                " import a real model with `exoctl models add NAME FILE.gguf`, or register an MLX"
                " model with `exoctl models add NAME DIR`.",
                file=sys.stderr,
            )
        return 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        print(f"demo: exod stopped (exit {code}); its log is {home / 'exod.log'}", file=sys.stderr)


def smollm2() -> Path | None:
    """SmolLM2's GGUF (fetched once by tools/smollm2.py), or None after saying why not."""
    fetch = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "smollm2.py")],
        stdout=subprocess.PIPE,
        check=False,
    )
    lines = fetch.stdout.decode().splitlines()
    if fetch.returncode == 0 and lines:
        return Path(lines[-1])
    why = "offline?" if fetch.returncode == UNAVAILABLE else f"exit {fetch.returncode}"
    print(
        f"demo: SmolLM2's GGUF could not be had ({why}), so this demo falls back to the tiny"
        " random-weight demo model: its text is gibberish by design",
        file=sys.stderr,
    )
    return None


def wait_for(sock: Path, daemon: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            print(f"demo: exod exited {daemon.returncode}", file=sys.stderr)
            return False
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
        except OSError:
            time.sleep(0.1)
        else:
            return True
    print("demo: exod did not start listening in time", file=sys.stderr)
    return False


if __name__ == "__main__":
    sys.exit(main())
