"""Every way exoctl can fail ends in one stderr line and the exit code the docs promise.

The failure mapping is pure and tested directly; the commands are run through click's CliRunner,
against no daemon at all or against a small in-process fake of exod's Control service.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket as socket_module
import tempfile
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from exoctl import client as client_module
from exoctl.cli import cli
from exoctl.failures import from_rpc_error, from_status, one_line, reason_of
from exod import API_VERSION, __version__
from exod.errors import REASON_KEY, REASONS, Exit
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc

DOCS = Path(__file__).resolve().parents[2] / "docs"
SOCKET = "/tmp/exoctl-test-none/exod.sock"  # never created: nothing listens there


# --- the pure mapping ---------------------------------------------------------------------------


def test_reason_in_trailing_metadata_decides_the_code() -> None:
    failure = from_status(
        grpc.StatusCode.ABORTED, "runner r-1 died (signal 9)", [(REASON_KEY, "crashed")], SOCKET
    )
    assert failure.code == Exit.TEMPFAIL
    assert failure.reason == "crashed"
    assert failure.message == "runner r-1 died (signal 9). retry later"
    # The reason wins over a code that would say otherwise.
    failure = from_status(grpc.StatusCode.UNKNOWN, "", [(REASON_KEY, "model_not_found")], SOCKET)
    assert failure.code == Exit.NOT_FOUND
    assert failure.message.startswith("model not found. ")


@pytest.mark.parametrize(("reason", "entry"), sorted(REASONS.items()))
def test_every_reason_maps_to_its_table_entry(reason: str, entry: Any) -> None:
    failure = from_status(entry.code, "detail", [(REASON_KEY, reason)], SOCKET)
    assert failure.code == entry.exit
    assert "\n" not in failure.message


def test_without_a_reason_the_grpc_code_decides() -> None:
    assert from_status(grpc.StatusCode.NOT_FOUND, "x", [], SOCKET).code == Exit.NOT_FOUND
    assert from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "x", [], SOCKET).code == Exit.TEMPFAIL
    assert from_status(grpc.StatusCode.UNKNOWN, "x", [], SOCKET).code == Exit.INTERNAL
    assert from_status(None, None, [], SOCKET).code == Exit.INTERNAL
    # An unknown reason (a newer daemon) falls back to the code too.
    assert from_status(grpc.StatusCode.ABORTED, "x", [(REASON_KEY, "new")], SOCKET).code == 75


def test_unavailable_is_69_and_names_the_socket() -> None:
    details = (
        "failed to connect to all addresses; last error: FAILED_PRECONDITION: unix:/s: "
        "connect failed: addr: unix:/s error: No such file or directory"
    )
    failure = from_status(grpc.StatusCode.UNAVAILABLE, details, [], SOCKET)
    assert failure.code == Exit.UNAVAILABLE
    assert failure.message.startswith("cannot reach exod: no socket there. is exod running?")
    assert SOCKET in failure.message
    refused = from_status(grpc.StatusCode.UNAVAILABLE, "error: Connection refused", [], SOCKET)
    assert "nothing is listening" in refused.message
    went = from_status(grpc.StatusCode.UNAVAILABLE, "Socket closed", [], SOCKET, mid_stream=True)
    assert went.code == Exit.UNAVAILABLE
    assert went.message.startswith("exod went away during the call.")


def test_a_socket_we_may_not_open_is_77() -> None:
    failure = from_status(grpc.StatusCode.UNAVAILABLE, "error: Permission denied", [], SOCKET)
    assert failure.code == Exit.PERMISSION


def test_advice_from_exod_is_not_repeated() -> None:
    details = "no runner r-9 is running: see `exoctl status`"
    failure = from_status(
        grpc.StatusCode.NOT_FOUND, details, [(REASON_KEY, "runner_not_found")], SOCKET
    )
    assert failure.message == details + "."
    failure = from_status(
        grpc.StatusCode.NOT_FOUND, "no runner r-9", [(REASON_KEY, "runner_not_found")], SOCKET
    )
    assert failure.message == "no runner r-9. list the runners with `exoctl status`"


def test_reason_of_reads_str_and_bytes() -> None:
    assert reason_of([("other", "x"), (REASON_KEY, "queue_full")]) == "queue_full"
    assert reason_of([(REASON_KEY, b"queue_full")]) == "queue_full"
    assert reason_of([]) is None


def test_one_line_joins_and_flattens() -> None:
    assert one_line("it broke.\nbadly", "fix it") == "it broke. badly. fix it"
    assert one_line("cancelled", "") == "cancelled."


def test_one_line_keeps_a_question_without_adding_a_period() -> None:
    assert one_line("Did you mean 'status'?", "see help") == "Did you mean 'status'? see help"
    assert one_line("stop!", "") == "stop!"


Metadatum = namedtuple("Metadatum", ["key", "value"])  # what gRPC hands out at run time


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, reason: str | None) -> None:
        self._code, self._details = code, details
        self._trailing = (Metadatum(REASON_KEY, reason),) if reason else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


def test_from_rpc_error_reads_the_call_status() -> None:
    err = FakeRpcError(grpc.StatusCode.NOT_FOUND, "no runner 'r-9'", "runner_not_found")
    failure = from_rpc_error(err, SOCKET)
    assert failure.code == Exit.NOT_FOUND
    assert failure.message == "no runner 'r-9'. list the runners with `exoctl status`"
    assert from_rpc_error(grpc.RpcError(), SOCKET).code == Exit.INTERNAL  # no status at all


def test_every_reason_is_documented() -> None:
    text = (DOCS / "exit-codes.md").read_text()
    missing = [reason for reason in REASONS if f"`{reason}`" not in text]
    assert not missing, f"docs/exit-codes.md does not list: {missing}"
    for code in Exit:
        assert re.search(rf"^\| {int(code)} \|", text, re.MULTILINE), f"exit code {code} missing"


# --- commands without a daemon ------------------------------------------------------------------


def invoke(*args: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=stdin, prog_name="exoctl")


def assert_fails(result: Result, code: int, *words: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("exoctl: ")
    for word in words:
        assert word in lines[0]


@pytest.fixture
def no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command builds a client at all."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("exoctl tried to connect")

    monkeypatch.setattr(client_module.Client, "__init__", refuse)


@pytest.mark.usefixtures("no_connection")
@pytest.mark.parametrize(
    "args",
    [
        ["run"],
        ["run", "demo", "hi", "--max-tokens", "0"],
        ["run", "demo", "hi", "--temperature", "-0.5"],
        ["run", "demo", "hi", "--temperature", "nan"],
        ["run", "demo", "hi", "--seed", "-1"],
        ["run", "Not A Name", "hi"],
        ["run", "hf:only-org", "hi"],
        ["kill"],
        ["kill", "r-1", "--all"],
        ["models", "add", "Bad Name", "/tmp"],
        ["models", "rm", "-x"],
        ["models", "demo", "--name", "UPPER"],
        ["events", "--since", "-1"],
        ["no-such-command"],
        ["status", "--no-such-option"],
    ],
)
def test_usage_errors_exit_64_before_connecting(args: list[str]) -> None:
    assert_fails(invoke(*args, "--socket", SOCKET), 64)


def test_a_bug_in_exoctl_is_one_line_and_70(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(socket: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("exoctl.cli.connect", broken)
    assert_fails(invoke("status", "--socket", SOCKET), 70, "boom at test_cli_errors.py:")


def test_help_and_version_exit_0() -> None:
    assert invoke("--help").exit_code == 0
    assert invoke("run", "--help").exit_code == 0
    version = invoke("--version")
    assert version.exit_code == 0
    assert version.stdout == f"exoctl {__version__} (api {API_VERSION})\n"


def test_bare_exoctl_shows_help_and_exits_64() -> None:
    result = invoke()
    assert result.exit_code == 64
    assert "Usage: exoctl" in result.stderr


@pytest.mark.usefixtures("no_connection")
def test_a_missing_model_directory_is_66_without_a_connection() -> None:
    result = invoke("run", "./no/such/model", "hi", "--socket", SOCKET)
    assert_fails(result, 66, "no/such/model", "does not exist")
    result = invoke("models", "add", "good", "/no/such/dir", "--socket", SOCKET)
    assert_fails(result, 66, "/no/such/dir")


@pytest.mark.usefixtures("no_connection")
def test_a_missing_model_directory_with_json_still_reports_an_error_object() -> None:
    result = invoke("run", "~/no/such/model", "hi", "--json", "--socket", SOCKET)
    assert result.exit_code == 66
    assert '"type":"error"' in result.stdout
    assert '"exit_code":66' in result.stdout


@pytest.mark.usefixtures("no_connection")
def test_a_prompt_that_is_not_utf8_is_64() -> None:
    assert_fails(invoke("run", "demo", "--socket", SOCKET, stdin=b"ok \xff"), 64, "UTF-8")


@pytest.mark.parametrize(
    "args", [["status"], ["status", "--json"], ["kill", "--all"], ["events"], ["models", "list"]]
)
def test_no_daemon_is_69_with_the_socket_in_the_message(args: list[str]) -> None:
    assert_fails(invoke(*args, "--socket", SOCKET), 69, SOCKET, "is exod running?")


def test_run_without_a_daemon_is_69() -> None:
    assert_fails(invoke("run", "demo", "hi", "--socket", SOCKET), 69, SOCKET)


def test_the_socket_defaults_to_exod_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXOD_SOCKET", raising=False)
    monkeypatch.setenv("EXOD_HOME", "/tmp/exoctl-test-home")
    assert_fails(invoke("status"), 69, "/tmp/exoctl-test-home/exod.sock")
    monkeypatch.setenv("EXOD_SOCKET", "/tmp/exoctl-test-env.sock")
    assert_fails(invoke("status"), 69, "/tmp/exoctl-test-env.sock")


# --- commands against a fake exod ---------------------------------------------------------------


class FakeControl(control_pb2_grpc.ControlServicer):
    """Just enough of exod's Control service to exercise how exoctl reads the answers."""

    def __init__(self) -> None:
        self.run_requests: list[control_pb2.RunRequest] = []
        self.api_versions: list[str] = []

    @staticmethod
    def _fail(context: Any, code: grpc.StatusCode, reason: str, details: str) -> None:
        context.set_trailing_metadata(((REASON_KEY, reason),))
        context.abort(code, details)

    def Run(self, request: control_pb2.RunRequest, context: Any) -> Iterator[control_pb2.RunReply]:
        self.run_requests.append(request)
        self.api_versions += [v for k, v in context.invocation_metadata() if k == "exo-api-version"]
        if request.model == "missing":
            self._fail(context, grpc.StatusCode.NOT_FOUND, "model_not_found", "no model 'missing'")
        yield control_pb2.RunReply(started=control_pb2.RunStarted(run_id="u", runner_id="r-1"))
        yield control_pb2.RunReply(tokens=control_pb2.TokenChunk(text="Hel"))
        yield control_pb2.RunReply(tokens=control_pb2.TokenChunk(text="lo"))
        if request.model == "crash":
            self._fail(context, grpc.StatusCode.ABORTED, "crashed", "runner r-1 died")
        if request.model == "vanish":
            return
        done = control_pb2.RunDone(prompt_tokens=len(request.prompt), generation_tokens=2)
        yield control_pb2.RunReply(done=done)

    def Status(self, request: control_pb2.StatusRequest, context: Any) -> control_pb2.StatusReply:
        return control_pb2.StatusReply(version="9.9.9", api_version="999", node_id="n")

    def Kill(self, request: control_pb2.KillRequest, context: Any) -> control_pb2.KillReply:
        if request.all:
            return control_pb2.KillReply()
        self._fail(context, grpc.StatusCode.NOT_FOUND, "runner_not_found", "no runner 'r-9'")
        raise AssertionError("abort returns only by raising")

    def Events(
        self, request: control_pb2.EventsRequest, context: Any
    ) -> Iterator[control_pb2.EventRecord]:
        yield control_pb2.EventRecord(seq=request.since + 1, kind="NodeStarted")
        # A follower then loses exod, as when it stops.
        context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")

    def Models(self, request: control_pb2.ModelsRequest, context: Any) -> control_pb2.ModelsReply:
        self._fail(context, grpc.StatusCode.NOT_FOUND, "model_not_found", "no model 'gone'")
        raise AssertionError("abort returns only by raising")

    def Import(
        self, request: control_pb2.ImportRequest, context: Any
    ) -> Iterator[control_pb2.ImportReply]:
        progress = control_pb2.ImportProgress(tensors_done=1, tensors_total=2)
        yield control_pb2.ImportReply(progress=progress)
        # Then the stream ends without `done`, as when exod stops mid-import.

    # The cluster commands are tested against real exods (tests/integration/test_cluster_join.py).
    def ClusterInit(
        self, request: control_pb2.ClusterInitRequest, context: Any
    ) -> control_pb2.ClusterReply:
        raise NotImplementedError

    def ClusterInvite(
        self, request: control_pb2.ClusterInviteRequest, context: Any
    ) -> control_pb2.ClusterInviteReply:
        raise NotImplementedError

    def ClusterJoin(
        self, request: control_pb2.ClusterJoinRequest, context: Any
    ) -> control_pb2.ClusterReply:
        raise NotImplementedError

    def ClusterRemove(
        self, request: control_pb2.ClusterRemoveRequest, context: Any
    ) -> control_pb2.ClusterRemoveReply:
        raise NotImplementedError

    def ClusterLeave(
        self, request: control_pb2.ClusterLeaveRequest, context: Any
    ) -> control_pb2.ClusterReply:
        raise NotImplementedError

    def Place(self, request: control_pb2.PlaceRequest, context: Any) -> control_pb2.PlaceReply:
        raise NotImplementedError


@pytest.fixture
def fake() -> Iterator[tuple[FakeControl, str]]:
    # A short directory of our own: tmp_path can exceed a Unix socket's length limit.
    directory = tempfile.mkdtemp(prefix="exoctl-", dir="/tmp")
    socket = f"{directory}/exod.sock"
    servicer = FakeControl()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    control_pb2_grpc.add_ControlServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        yield servicer, socket
    finally:
        server.stop(grace=None)
        shutil.rmtree(directory, ignore_errors=True)


def test_run_streams_the_text_then_one_newline(fake: tuple[FakeControl, str]) -> None:
    servicer, socket = fake
    result = invoke("run", "demo", "--socket", socket, "--seed", "7", stdin=b"h\xc3\xa9 \n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Hello\n"
    assert result.stderr == ""
    request = servicer.run_requests[0]
    assert request.prompt == "hé \n"  # stdin byte for byte
    assert (request.max_tokens, request.temperature, request.raw) == (256, 0.0, False)
    assert (request.has_seed, request.seed) == (True, 7)
    assert servicer.api_versions == [API_VERSION]


def test_run_makes_a_model_path_absolute_and_keeps_a_bare_word_a_name(
    fake: tuple[FakeControl, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, socket = fake
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert invoke("run", "m", "hi", "--socket", socket).exit_code == 0
    assert invoke("run", "./m", "hi", "--socket", socket).exit_code == 0
    assert invoke("run", "hf:org/name", "hi", "--socket", socket).exit_code == 0
    # A bare word is a registered name even when a directory of that name is here.
    assert [r.model for r in servicer.run_requests] == ["m", str(tmp_path / "m"), "hf:org/name"]


def test_run_json_lines_end_with_done(fake: tuple[FakeControl, str]) -> None:
    _, socket = fake
    result = invoke("run", "demo", "hi", "--json", "--socket", socket)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        '{"type":"token","text":"Hel"}',
        '{"type":"token","text":"lo"}',
        '{"type":"done","prompt_tokens":2,"generation_tokens":2,"ttft_s":0.0,'
        '"tokens_per_s":0.0,"stop_reason":"","cached_tokens":0,"instance":null}',
    ]


def test_a_run_that_fails_midway_exits_with_its_reason(fake: tuple[FakeControl, str]) -> None:
    _, socket = fake
    result = invoke("run", "crash", "hi", "--socket", socket)
    assert result.stdout == "Hello\n"
    assert_fails(result, 75, "runner r-1 died", "retry later")
    result = invoke("run", "crash", "hi", "--json", "--socket", socket)
    assert result.exit_code == 75
    assert result.stdout.splitlines()[-1] == (
        '{"type":"error","reason":"crashed","message":"runner r-1 died. retry later",'
        '"exit_code":75}'
    )


def test_a_run_stream_that_ends_without_done_is_69(fake: tuple[FakeControl, str]) -> None:
    _, socket = fake
    assert_fails(invoke("run", "vanish", "hi", "--socket", socket), 69, socket)


def test_kill_of_an_unknown_runner_is_66(fake: tuple[FakeControl, str]) -> None:
    _, socket = fake
    assert_fails(invoke("kill", "r-9", "--socket", socket), 66, "no runner 'r-9'", "exoctl status")


def test_kill_all_with_nothing_running_is_0(fake: tuple[FakeControl, str]) -> None:
    _, socket = fake
    result = invoke("kill", "--all", "--json", "--socket", socket)
    assert result.exit_code == 0
    assert result.stdout == '{"killed":[]}\n'


def test_models_rm_of_an_unknown_name_is_66(fake: tuple[FakeControl, str]) -> None:
    _, socket = fake
    assert_fails(invoke("models", "rm", "gone", "--socket", socket), 66, "exoctl models list")


def test_status_warns_once_about_another_api_version(fake: tuple[FakeControl, str]) -> None:
    _, socket = fake
    result = invoke("status", "--json", "--socket", socket)
    assert result.exit_code == 0
    assert result.stdout.startswith('{"version":"9.9.9","api_version":"999"')
    assert result.stderr.count("API version 999") == 1


def slow_proxy(target: str, delay: float) -> tuple[str, socket_module.socket]:
    """A Unix socket that accepts at once but passes bytes on to `target` only after `delay`:
    an exod too busy to answer a new connection's handshake straight away."""
    path = f"{Path(target).parent}/slow.sock"
    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)

    def pipe(src: socket_module.socket, dst: socket_module.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket_module.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                time.sleep(delay)
                upstream = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
                upstream.connect(target)
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return path, listener


def test_a_daemon_slow_to_answer_the_handshake_is_still_reached(
    fake: tuple[FakeControl, str],
) -> None:
    # gRPC takes min_reconnect_backoff_ms as the handshake's deadline too; with it at 100 ms,
    # clients of a busy exod failed with "timed out before receiving SETTINGS frame" (69).
    _, target = fake
    path, listener = slow_proxy(target, delay=1.0)
    try:
        result = invoke("status", "--json", "--socket", path)
    finally:
        listener.close()
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith('{"version":"9.9.9"')


def test_events_that_lose_exod_midway_are_69(fake: tuple[FakeControl, str]) -> None:
    _, socket = fake
    result = invoke("events", "--follow", "--since", "4", "--socket", socket)
    assert result.stdout.startswith("5  1970-01-01T00:00:00.000Z  NodeStarted")
    assert_fails(result, 69, "exod went away")


# --- messages that say what to do ---------------------------------------------------------------


def assert_says(result: Result, code: int, line: str) -> None:
    """The command failed with `code` and exactly this one stderr line."""
    assert (result.exit_code, result.stderr) == (code, f"exoctl: {line}\n"), result.exception


def test_a_mistyped_command_gets_clicks_suggestion_unmangled() -> None:
    assert_says(
        invoke("stauts"), 64, "No such command 'stauts'. Did you mean 'status'? see `exoctl --help`"
    )


@pytest.mark.usefixtures("no_connection")
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--json", "status"], "--json goes after the command. try `exoctl status --json`"),
        (
            ["--socket", "/tmp/x.sock", "status"],
            "--socket goes after the command. try `exoctl status --socket /tmp/x.sock`",
        ),
        (
            ["--socket=/tmp/x.sock", "kill", "--all"],
            "--socket goes after the command. try `exoctl kill --socket=/tmp/x.sock --all`",
        ),
        (["-f", "events"], "-f goes after the command. try `exoctl events -f`"),
        (["--all", "kill"], "--all goes after the command. try `exoctl kill --all`"),
        (
            ["--json", "models", "list"],
            "--json goes after the command. try `exoctl models list --json`",
        ),
        (
            ["models", "--json", "list"],
            "--json goes after the command. try `exoctl models list --json`",
        ),
        (
            ["--json", "run", "demo", "hi there"],
            "--json goes after the command. try `exoctl run --json demo 'hi there'`",
        ),
        (["--json"], "--json goes after a command's name. e.g. `exoctl events --json`"),
        (
            ["status", "--version"],
            "--version is an option of exoctl itself, not of status. try `exoctl --version`",
        ),
        # An option that no command has: click's own words.
        (["--follow", "status"], "No such option '--follow'. see `exoctl --help`"),
    ],
)
def test_an_option_on_the_wrong_side_of_the_command_says_where_it_goes(
    args: list[str], line: str
) -> None:
    assert_says(invoke(*args), 64, line)


@pytest.mark.usefixtures("no_connection")
@pytest.mark.parametrize(
    "args",
    [
        ["run", "Demo", "hi"],
        ["models", "add", "Demo", "/tmp"],
        ["models", "rm", "Demo"],
        ["models", "demo", "--name", "Demo"],
    ],
)
def test_a_name_with_capitals_says_names_are_lowercase(args: list[str]) -> None:
    result = invoke(*args, "--socket", SOCKET)
    assert_says(result, 64, "model names are lowercase, and 'Demo' is not. did you mean 'demo'?")


@pytest.mark.usefixtures("no_connection")
def test_a_bare_word_that_is_no_name_but_a_directory_here_suggests_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "My Model").mkdir()
    (tmp_path / "Qwen3").mkdir()
    monkeypatch.chdir(tmp_path)
    assert_says(
        invoke("run", "My Model", "hi", "--socket", SOCKET),
        64,
        "'My Model' is not a model name, but a directory of that name is here. "
        "to run the directory, write `exoctl run './My Model'`",
    )
    assert_says(
        invoke("run", "Qwen3", "hi", "--socket", SOCKET),
        64,
        "'Qwen3' is not a model name (names are lowercase), but a directory of that name is "
        "here. to run the directory, write `exoctl run ./Qwen3`",
    )


def test_an_unknown_name_that_is_a_directory_here_suggests_the_path(
    fake: tuple[FakeControl, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, socket = fake
    line = (
        "model 'missing' not found (a bare word is a registered name, never a directory). "
        "to run the directory missing here, write `exoctl run ./missing`"
    )
    monkeypatch.chdir(tmp_path)
    # Without such a directory, exod's words stand.
    assert_says(
        invoke("run", "missing", "hi", "--socket", socket),
        66,
        "no model 'missing'. check the name with `exoctl models list`",
    )
    (tmp_path / "missing").mkdir()
    assert_says(invoke("run", "missing", "hi", "--socket", socket), 66, line)
    result = invoke("run", "missing", "hi", "--json", "--socket", socket)
    assert result.exit_code == 66
    assert json.loads(result.stdout) == {
        "type": "error",
        "reason": "model_not_found",
        "message": line,
        "exit_code": 66,
    }


def test_an_import_that_ends_unfinished_is_69(
    fake: tuple[FakeControl, str], tmp_path: Path
) -> None:
    _, socket = fake
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    result = invoke("models", "add", "m", str(gguf), "--socket", socket, "--json")
    assert_fails(result, 69, "exod ended the import without finishing it")
    progress, error = result.stdout.splitlines()
    assert progress.startswith('{"type":"progress"')
    assert error.startswith('{"type":"error"') and '"exit_code":69' in error


def test_a_missing_gguf_is_66_without_connecting(no_connection: None, tmp_path: Path) -> None:
    result = invoke("models", "add", "m", str(tmp_path / "m.gguf"))
    assert_fails(result, 66, f"GGUF file {tmp_path / 'm.gguf'} does not exist")
