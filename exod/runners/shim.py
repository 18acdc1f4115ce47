"""The runner's group leader: a tiny process that imports no MLX and owns the lifeline.

    python -m exod.runners.shim --lifeline FD -- [WRAPPER...] python -m exod.runners.runner ...

exod starts the shim in a new process group; the shim starts the runner (through the user's
EXOD_RUNNER_WRAPPER, if any) in that same group and waits for it. Why a separate process: the
runner spends its life inside MLX's C++ code, where a call that holds the GIL can starve any
Python thread watching for the daemon's death. The shim has nothing else to do, so it always
notices, and then kills the whole group, wrapper children included:

- the lifeline is a pipe whose write end only exod holds: EOF means exod is gone (any OS);
- on Linux, PR_SET_PDEATHSIG delivers SIGUSR1 when exod dies, a second line that needs no thread.

SIGTERM sent to the group is for the runner: the shim ignores it and exits with the runner.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from types import FrameType

PR_SET_PDEATHSIG = 1


def kill_group(*_: object) -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def watch_lifeline(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass  # exod never writes; any byte is ignored, only EOF matters
    kill_group()


def arm_parent_death() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)


def exit_like(status: int) -> int:
    """Leave the way the runner did, so exod sees the runner's own exit status or signal."""
    if status < 0:
        # SIGKILL and SIGSTOP have no handler to reset (setting one raises OSError).
        with contextlib.suppress(OSError):
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exod.runners.shim")
    parser.add_argument("--lifeline", type=int, required=True)
    parser.add_argument("--parent", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    def ignore(signum: int, frame: FrameType | None) -> None:
        pass  # the runner got the same SIGTERM; we leave when it does

    signal.signal(signal.SIGUSR1, kill_group)
    signal.signal(signal.SIGTERM, ignore)
    arm_parent_death()
    if args.parent and os.getppid() != args.parent:
        kill_group()  # exod died before the death signal was armed
    threading.Thread(target=watch_lifeline, args=(args.lifeline,), daemon=True).start()
    try:
        child = subprocess.Popen(command, close_fds=False)
    except OSError as e:
        print(f"exod shim: cannot start {command[0]!r}: {e}", file=sys.stderr, flush=True)
        return 127
    while True:
        try:
            status = child.wait()
            break
        except InterruptedError:  # pragma: no cover  # PEP 475 retries; kept for clarity
            continue
    return exit_like(status)


if __name__ == "__main__":
    sys.exit(main())
