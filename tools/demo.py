"""The quick start's main job: exod up on a private home, the demo model made, one generation.

Run it through `./dev demo [PROMPT]`. It starts a real exod in the foreground of this script (on a
temporary home, so it never disturbs an exod you already run), asks it to write and register the
tiny random-weight demo model, streams a generation through exoctl, shows `exoctl status`, and
stops exod again with SIGTERM, leaving nothing running.
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


def main() -> int:
    prompt = " ".join(sys.argv[1:]) or "Tell me about the sea."
    home = Path(tempfile.mkdtemp(prefix="exod-demo-"))
    sock = home / "exod.sock"
    # The HTTP API stays off: a real exod may hold its port on this machine.
    env = {**os.environ, "EXOD_HOME": str(home), "EXOD_SOCKET": str(sock), "EXOD_HTTP_PORT": "0"}
    log = open(home / "exod.log", "wb")  # noqa: SIM115  # exod writes it while we run
    print(f"demo: starting exod (home {home})", file=sys.stderr)
    daemon = subprocess.Popen([sys.executable, "-m", "exod"], env=env, stdout=log, stderr=log)
    try:
        if not wait_for(sock, daemon):
            print((home / "exod.log").read_text(), file=sys.stderr)
            return 1
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
        print(
            "\ndemo: the demo model has random weights, so its text is gibberish by design;"
            " register a real MLX model with `exoctl models add NAME DIR`.",
            file=sys.stderr,
        )
        return 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        print(f"demo: exod stopped (exit {code}); its log is {home / 'exod.log'}", file=sys.stderr)


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
