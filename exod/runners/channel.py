"""The runner's two ends of the pipe: what it sends (Channel) and what it was sent (Inbox).

Threads share them: the main thread (MLX) sends Tokens, Done and progress; the heartbeat thread
sends a Heartbeat every second with the counters the main thread keeps in Stats; the reader thread
fills the Inbox and, on end of stream (the daemon is gone), kills the runner's whole group.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

from exod.errors import Exit
from exod.proto.exo.v1 import runner_pb2
from exod.runners.pipe import PipeError, read_message_sync, write_message_sync

log = logging.getLogger("exod.runner")

HEARTBEAT_S = 1.0


class Channel:
    """The runner's sending end: FromRunner frames, whole, from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, msg: runner_pb2.FromRunner) -> None:
        write_message_sync(self._sock, msg, self._lock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def progress(self, phase: str, current: int = 0, total: int = 0, request_id: str = "") -> None:
        progress = runner_pb2.LoadProgress(
            phase=phase, current=current, total=total, request_id=request_id
        )
        self.send(runner_pb2.FromRunner(progress=progress))

    def error(self, reason: str, message: str, request_id: str = "") -> None:
        error = runner_pb2.RunnerError(request_id=request_id, reason=reason, message=message)
        self.send(runner_pb2.FromRunner(error=error))


class Inbox:
    """What the daemon sent, in arrival order, for the main thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: queue.Queue[runner_pb2.ToRunner] = queue.Queue()

    def read_forever(self) -> NoReturn:
        """Reader thread: runs until the daemon's end of the pipe closes, then ends the group."""
        while True:
            try:
                msg = read_message_sync(self._sock, runner_pb2.ToRunner)
            except (PipeError, OSError) as e:
                log.warning("runner pipe broke: %s", e)
                msg = None
            if msg is None:
                end_own_group("the daemon closed the runner pipe")
            self._queue.put(msg)

    def next(self) -> runner_pb2.ToRunner:
        """The next message, waiting for it (the runner has nothing else to do)."""
        return self._queue.get()

    def wait(self, timeout: float) -> runner_pb2.ToRunner | None:
        """The next message, waiting at most `timeout` seconds for it; None if none came."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def poll(self) -> runner_pb2.ToRunner | None:
        """The next message if one has come, else None at once (the batch is running)."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None


def end_own_group(why: str) -> NoReturn:
    """Kill this runner's process group (MLX helpers, anything it started), then exit."""
    log.error("%s: ending the runner", why)
    pgid = os.getpgid(0)
    # Only a group this runner leads is its own. Started by hand without a new session, the
    # group is the shell's or the test runner's, and only this process may go.
    if pgid == os.getpid():
        os.killpg(pgid, signal.SIGKILL)
    os._exit(Exit.UNAVAILABLE)


@dataclass
class Stats:
    """What the Heartbeat reports; written by the main thread only, read by the heartbeat's."""

    active: int = 0
    prompt_cache_bytes: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    def heartbeat(self) -> runner_pb2.FromRunner:
        beat = runner_pb2.Heartbeat(
            active=self.active,
            prompt_cache_bytes=self.prompt_cache_bytes,
            prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
        )
        return runner_pb2.FromRunner(heartbeat=beat)


def heartbeat(channel: Channel, stats: Stats) -> None:
    """Heartbeat thread: a beat every second, so that the daemon tells busy from hung."""
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            channel.send(stats.heartbeat())
        except OSError:
            return  # the pipe is gone; the reader thread ends the process
