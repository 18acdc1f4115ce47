"""The daemon's end of a real runner subprocess: spawn `python -m exod.runners.runner`, speak the
pipe protocol over a real socket pair, and collect what it streams, per request."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exod import RUNNER_PROTOCOL_VERSION
from exod.proto.exo.v1 import runner_pb2
from exod.runners.pipe import read_message_sync, write_message_sync


@dataclass
class Outcome:
    """Everything one request got: its messages in order, its text, and how it ended."""

    messages: list[runner_pb2.FromRunner] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(m.tokens.text for m in self.messages if m.WhichOneof("msg") == "tokens")

    @property
    def end(self) -> runner_pb2.FromRunner:
        return self.messages[-1]

    @property
    def done(self) -> runner_pb2.Done:
        assert self.end.WhichOneof("msg") == "done", self.end
        return self.end.done


class Runner:
    """One runner subprocess and the daemon's end of its pipe."""

    def __init__(self, *, parent: int | None = None, own_session: bool = True) -> None:
        ours, theirs = socket.socketpair()
        self.sock = ours
        self.lock = threading.Lock()
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        args = [sys.executable, "-m", "exod.runners.runner", "--fd", str(theirs.fileno())]
        args += ["--parent", str(os.getpid() if parent is None else parent)]
        self.proc = subprocess.Popen(
            args,
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            # A new group either way, so that the runner's lifeline kills only its own group.
            start_new_session=own_session,
            process_group=None if own_session else 0,
        )
        theirs.close()
        self.progress: list[runner_pb2.LoadProgress] = []
        self.ready: runner_pb2.Ready | None = None
        self.heartbeats: list[runner_pb2.Heartbeat] = []

    def send(self, **kwargs: Any) -> None:
        write_message_sync(self.sock, runner_pb2.ToRunner(**kwargs), self.lock)

    def recv(self, timeout: float = 30) -> runner_pb2.FromRunner:
        """The next message that is not a heartbeat (heartbeats are kept in .heartbeats)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            msg = read_message_sync(self.sock, runner_pb2.FromRunner)
            assert msg is not None, f"runner closed the pipe (exit {self.proc.poll()})"
            if msg.WhichOneof("msg") != "heartbeat":
                return msg
            self.heartbeats.append(msg.heartbeat)

    def heartbeat(self, timeout: float = 5) -> runner_pb2.Heartbeat:
        """The next heartbeat; nothing else may come meanwhile."""
        self.sock.settimeout(timeout)
        msg = read_message_sync(self.sock, runner_pb2.FromRunner)
        assert msg is not None, f"runner closed the pipe (exit {self.proc.poll()})"
        assert msg.WhichOneof("msg") == "heartbeat", msg
        self.heartbeats.append(msg.heartbeat)
        return msg.heartbeat

    def hello(self) -> runner_pb2.HelloReply:
        self.send(hello=runner_pb2.Hello(protocol_version=RUNNER_PROTOCOL_VERSION))
        reply = self.recv()
        assert reply.WhichOneof("msg") == "hello", reply
        return reply.hello

    def load(self, path: Path, timeout: float = 120, **options: Any) -> runner_pb2.FromRunner:
        """Send Load; collect progress; return the Ready or RunnerError that ends the load."""
        self.send(load=runner_pb2.Load(model_path=str(path), **options))
        while True:
            msg = self.recv(timeout)
            if msg.WhichOneof("msg") != "progress":
                if msg.WhichOneof("msg") == "ready":
                    self.ready = msg.ready
                return msg
            self.progress.append(msg.progress)

    def generate(self, **kwargs: Any) -> tuple[str, list[runner_pb2.FromRunner]]:
        """Run one request to its end; the text streamed and every message received."""
        options: dict[str, Any] = {"request_id": "r", "max_tokens": 40} | kwargs
        request = runner_pb2.Generate(**options)
        self.send(generate=request)
        outcome = self.collect([request.request_id])[request.request_id]
        return outcome.text, outcome.messages

    def collect(
        self, ids: list[str], timeout: float = 60, log: list[runner_pb2.FromRunner] | None = None
    ) -> dict[str, Outcome]:
        """Read until every request in `ids` has ended (Done or RunnerError), in any order.

        Every message read is appended to `log` too, when given, in the order it came.
        """
        outcomes = {rid: Outcome() for rid in ids}
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while pending:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if log is not None:
                log.append(msg)
            rid = request_id(msg)
            assert rid in outcomes, f"a message for a request not asked about: {msg}"
            outcomes[rid].messages.append(msg)
            if msg.WhichOneof("msg") in {"done", "error"}:
                pending.discard(rid)
        return outcomes

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            # Its own process group, started by this test: nothing else lives in it.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def request_id(msg: runner_pb2.FromRunner) -> str:
    which = msg.WhichOneof("msg")
    if which in {"tokens", "done", "error", "progress"}:
        return str(getattr(msg, which).request_id)
    raise AssertionError(f"not a request's message: {msg}")
