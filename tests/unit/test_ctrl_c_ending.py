"""exoctl's Ctrl-C table: what each phase owes stdout and stderr (the signal itself is tested on
real processes in tests/integration/test_interrupt.py)."""

from __future__ import annotations

import io
import json
import os
import signal

import pytest

from exoctl import interrupt
from exoctl.run import CANCELLED, RunOutput
from exoctl.terminal import StatusLine
from exod.errors import Exit
from exod.proto.exo.v1 import control_pb2


def test_the_code_is_the_tables() -> None:
    # Spelled out in interrupt.py so that it imports nothing slow; it must not drift.
    assert interrupt.INTERRUPTED == Exit.INTERRUPTED == interrupt.Ending().code


def test_ending_applies_within_the_block_only() -> None:
    follow = interrupt.Ending(code=0, message=None)
    assert interrupt._endings == [interrupt.Ending()]
    with interrupt.ending(follow):
        assert interrupt._endings[-1] is follow
    assert interrupt._endings == [interrupt.Ending()]


def output(*, as_json: bool) -> tuple[RunOutput, io.BytesIO]:
    stdout = io.BytesIO()
    return RunOutput(stdout, StatusLine(io.StringIO()), as_json=as_json), stdout


def test_a_run_cut_mid_line_ends_its_line() -> None:
    out, stdout = output(as_json=False)
    assert out.ending(CANCELLED) == b""  # nothing written: nothing to end
    out.reply(control_pb2.RunReply(tokens=control_pb2.TokenChunk(text="half a sen")))
    assert out.ending(CANCELLED) == b"\n"
    assert stdout.getvalue() == b"half a sen"


def test_a_json_run_cut_short_ends_with_its_error_line() -> None:
    out, _ = output(as_json=True)
    assert json.loads(out.ending(CANCELLED)) == {
        "type": "error",
        "reason": "cancelled",
        "message": "interrupted; the generation was cancelled.",
        "exit_code": 130,
    }
    assert out.ending(CANCELLED).endswith(b"}\n")


class Ended(Exception):
    """Stands in for os._exit, so that the handler can be called in this process."""


def test_a_second_ctrl_c_while_the_first_ends_exoctl_says_nothing(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def exit_(code: int) -> None:
        raise Ended(code)

    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(interrupt, "_ending_now", False)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Ended) as ended:
        interrupt._on_sigint(signal.SIGINT, None)
    assert ended.value.args == (130,)
    interrupt._on_sigint(signal.SIGINT, None)  # the second: returns, writes nothing
    assert capfd.readouterr().err == "exoctl: interrupted.\n"
    # The handler stays in place: switching it to SIG_IGN lets CPython print a traceback for a
    # second signal it had noted before the switch ("Signal 2 ignored due to race condition").
    assert signal.getsignal(signal.SIGINT) is handler
