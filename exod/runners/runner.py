"""The runner: one model, loaded with mlx-lm, in a subprocess of its own.

    python -m exod.runners.runner --fd N --parent PID

The daemon spawns it with one end of a socket pair as fd N, in a new process group. Messages are
framed by exod.runners.pipe: ToRunner in, FromRunner out. Threads:
  - main: the handshake, the load, then one generation at a time (MLX runs here);
  - pipe-reader: reads every frame; queues Generate/Shutdown for main, marks Cancel at once, and
    on end of stream (the daemon is gone) kills the runner's whole process group;
  - heartbeat: a Heartbeat every second, so that the daemon can tell a busy runner from a hung one.

Nothing imports MLX until the daemon asked for a load and "started" has been reported.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from exod import RUNNER_PROTOCOL_VERSION
from exod.errors import REASONS, Exit, ExoError
from exod.models.inspect import context_length, inspect_model
from exod.proto.exo.v1 import runner_pb2
from exod.runners.pipe import PipeError, read_message_sync, write_message_sync
from exod.runners.stops import StopFilter

log = logging.getLogger("exod.runner")

HEARTBEAT_S = 1.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Cancels remembered for requests not seen yet (a Cancel can overtake its queued Generate).
MAX_REMEMBERED_CANCELS = 1024
MAX_DETAIL_CHARS = 300


# --- the pipe -------------------------------------------------------------------------------


class Channel:
    """The runner's sending end: FromRunner frames, whole, from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, msg: runner_pb2.FromRunner) -> None:
        write_message_sync(self._sock, msg, self._lock)

    def progress(self, phase: str, current: int = 0, total: int = 0, request_id: str = "") -> None:
        progress = runner_pb2.LoadProgress(
            phase=phase, current=current, total=total, request_id=request_id
        )
        self.send(runner_pb2.FromRunner(progress=progress))

    def error(self, reason: str, message: str, request_id: str = "") -> None:
        error = runner_pb2.RunnerError(request_id=request_id, reason=reason, message=message)
        self.send(runner_pb2.FromRunner(error=error))


class Inbox:
    """What the daemon sent: a queue for the main thread, and cancellations marked on arrival."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: queue.Queue[runner_pb2.ToRunner] = queue.Queue()
        self._lock = threading.Lock()
        self._cancelled: OrderedDict[str, None] = OrderedDict()

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
            if msg.WhichOneof("msg") == "cancel":
                self._mark_cancelled(msg.cancel.request_id)
            else:
                self._queue.put(msg)

    def next(self) -> runner_pb2.ToRunner:
        return self._queue.get()

    def _mark_cancelled(self, request_id: str) -> None:
        with self._lock:
            self._cancelled[request_id] = None
            while len(self._cancelled) > MAX_REMEMBERED_CANCELS:
                self._cancelled.popitem(last=False)

    def is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.pop(request_id, None)


def end_own_group(why: str) -> NoReturn:
    """Kill this runner's process group (MLX helpers, anything it started), then exit."""
    log.error("%s: ending the runner", why)
    pgid = os.getpgid(0)
    # Only a group this runner leads is its own. Started by hand without a new session, the
    # group is the shell's or the test runner's, and only this process may go.
    if pgid == os.getpid():
        os.killpg(pgid, signal.SIGKILL)
    os._exit(Exit.UNAVAILABLE)


def heartbeat(channel: Channel) -> None:
    beat = runner_pb2.FromRunner(heartbeat=runner_pb2.Heartbeat())
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            channel.send(beat)
        except OSError:
            return  # the pipe is gone; the reader thread ends the process


# --- loading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    model: Any  # mlx_lm is untyped: an nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    context_length: int
    load_s: float


# Exceptions of mlx_lm.utils.load_model by type, after the two cases that need a closer look.
_LOAD_ERRORS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (ImportError, "model_unsupported"),
    ((json.JSONDecodeError, UnicodeError), "model_unreadable"),
    ((KeyError, TypeError), "model_unreadable"),  # ModelArgs.from_dict: a required field missing
    (RuntimeError, "weights_corrupt"),  # mx.load: a garbled or truncated safetensors file
    (OSError, "model_unreadable"),
)


def load_error_reason(exc: BaseException) -> str:
    """The reason for an exception raised by mlx_lm.utils.load_model, by what it says."""
    if isinstance(exc, FileNotFoundError):
        # A missing config.json names its file; "No safetensors found" names none.
        missing = str(exc.filename or "")
        return "model_unreadable" if missing.endswith(".json") else "weights_corrupt"
    if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError | UnicodeError):
        text = str(exc)
        if "not supported" in text or "trust_remote_code" in text:
            return "model_unsupported"
        return "weights_corrupt"  # load_weights: missing or unexpected parameters, wrong shapes
    return next((reason for kinds, reason in _LOAD_ERRORS if isinstance(exc, kinds)), "internal")


def load_error_message(reason: str, path: Path, exc: BaseException) -> str:
    detail = one_line(exc)
    what_to_do = {
        "model_unsupported": "use a model of an architecture the installed mlx-lm supports",
        "weights_corrupt": "the weights are damaged or do not match config.json: fetch the "
        "model again",
        "model_unreadable": "the model files are damaged or incomplete: fetch the model again",
    }.get(reason, "see the runner log, and report it if it persists")
    return f"cannot load {path}: {detail}; {what_to_do}"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def load(model_path: str, channel: Channel) -> Loaded:
    """Load the model as mlx_lm.load(path) does, reporting progress per phase and per layer.

    Raises ExoError with the reason the load failed.
    """
    start = time.perf_counter()
    channel.progress("started")
    path = Path(model_path)
    # Cheap checks first (ExoError when they fail), and safe ones: mx.load would block forever
    # on a named pipe.
    inspect_model(path)

    # MLX loads only now: a runner that is refused above never pays for it.
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    channel.progress("imported")
    try:
        # What mlx_lm.load does, with lazy=True so that the layers can be evaluated one by one.
        model, config = load_model(path, lazy=True, trust_remote_code=False)
    except Exception as e:
        reason = load_error_reason(e)
        raise ExoError(reason, load_error_message(reason, path, e)) from e

    layers = list(getattr(model, "layers", []))
    try:
        for i, layer in enumerate(layers, start=1):
            mx.eval(layer.parameters())
            channel.progress("weights", i, len(layers))
        mx.eval(model.parameters())  # embeddings, final norm, head
    except Exception as e:
        raise ExoError("weights_corrupt", load_error_message("weights_corrupt", path, e)) from e
    if not layers:
        channel.progress("weights", 1, 1)

    try:
        eos_token_ids = config.get("eos_token_id", None)
        tokenizer = load_tokenizer(path, None, eos_token_ids=eos_token_ids)  # type: ignore[no-untyped-call]  # mlx-lm leaves it unannotated
    except Exception as e:
        raise ExoError("model_unreadable", load_error_message("model_unreadable", path, e)) from e
    channel.progress("tokenizer")
    return Loaded(model, tokenizer, context_length(config), time.perf_counter() - start)


# --- generating -----------------------------------------------------------------------------


class _Cancelled(Exception):
    """Raised from the prefill callback to abandon a cancelled request before its first token."""


def prompt_limit(context_length: int, max_prompt_tokens: int) -> int | None:
    """The most prompt tokens allowed: the model's context and the daemon's cap, when set."""
    limits = [n for n in (context_length, max_prompt_tokens) if n > 0]
    return min(limits) if limits else None


def check_request(req: runner_pb2.Generate, prompt_tokens: int, limit: int | None) -> None:
    """ExoError for a request this model will not run; the runner stays loaded for the next."""
    if req.max_tokens < 1:
        raise ExoError("invalid_argument", f"max_tokens must be at least 1, not {req.max_tokens}")
    if req.temperature < 0:
        raise ExoError("invalid_argument", f"temperature must be >= 0, not {req.temperature}")
    if any(not s for s in req.stop):
        raise ExoError("invalid_argument", "a stop sequence must not be empty")
    # An empty prompt is refused in chat mode too, where the template alone has tokens.
    if prompt_tokens == 0 or not (req.prompt or req.messages):
        raise ExoError("prompt_empty", "the prompt is empty: give some text to continue")
    if limit is not None and prompt_tokens > limit:
        raise ExoError(
            "prompt_too_long",
            f"the prompt has {prompt_tokens} tokens, more than the {limit} allowed: shorten it "
            "(or raise EXOD_MAX_PROMPT_TOKENS, up to the model's context length)",
        )


def encode_prompt(req: runner_pb2.Generate, tokenizer: Any) -> tuple[str | list[int], int]:
    """The prompt as stream_generate should get it, and its length in tokens.

    A raw prompt stays a string so that stream_generate encodes it exactly as mlx_lm.generate
    does; it is encoded here the same way only to be counted. A prompt goes through the chat
    template unless it is raw or the model has none (mlx_lm.generate's rule). A conversation
    (`messages`) follows the same rule, so that `exoctl run` and /v1/chat/completions agree: a
    lone user message to a model without a template goes as it is, like a prompt; several
    messages are refused, since without a template there is no right way to join them.
    """
    if req.messages and not tokenizer.has_chat_template:
        if len(req.messages) == 1 and req.messages[0].role == "user":
            return raw_prompt(req.messages[0].content, tokenizer)
        raise ExoError(
            "invalid_argument",
            "this model has no chat template, so there is no right way to join several "
            "messages into one prompt: send one user message, or a completion (/v1/completions)",
        )
    if req.messages:
        conversation = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            ids = list(tokenizer.apply_chat_template(conversation, add_generation_prompt=True))
        except Exception as e:  # the template is the model's code: jinja raises what it likes
            # Templates refuse conversations they cannot render ("roles must alternate").
            raise ExoError(
                "invalid_argument",
                f"the model's chat template refused the conversation: {one_line(e)}",
            ) from e
        return ids, len(ids)
    if not req.raw and tokenizer.has_chat_template:
        messages = [{"role": "user", "content": req.prompt}]
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return ids, len(ids)
    return raw_prompt(req.prompt, tokenizer)


def raw_prompt(prompt: str, tokenizer: Any) -> tuple[str, int]:
    """A prompt sent as it is, and its length in tokens as stream_generate will encode it."""
    bos = tokenizer.bos_token
    add_special_tokens = bos is None or not prompt.startswith(bos)
    return prompt, len(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))


def generate(req: runner_pb2.Generate, loaded: Loaded, channel: Channel, inbox: Inbox) -> None:
    """Run one request to its end; any failure is reported for it and the runner goes on."""
    rid = req.request_id
    try:
        _generate(req, loaded, channel, inbox)
    except ExoError as e:
        channel.error(e.reason, e.message, rid)
    except Exception as e:
        log.exception("generation %s failed", rid)
        channel.error("internal", f"generation failed: {one_line(e)}; see the runner log", rid)
    finally:
        inbox.forget(rid)


def _generate(req: runner_pb2.Generate, loaded: Loaded, channel: Channel, inbox: Inbox) -> None:
    import mlx.core as mx  # loaded already; bound here to keep the module light
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    rid = req.request_id
    start = time.perf_counter()
    prompt, prompt_tokens = encode_prompt(req, loaded.tokenizer)
    check_request(req, prompt_tokens, prompt_limit(loaded.context_length, req.max_prompt_tokens))

    options: dict[str, Any] = {}
    if req.temperature > 0:
        options["sampler"] = make_sampler(temp=req.temperature)
        if req.has_seed:
            mx.random.seed(req.seed)
    # else no sampler at all: mlx-lm's default is greedy, which is what mlx_lm.generate does.

    def on_prefill(done: int, total: int) -> None:
        if inbox.is_cancelled(rid):
            raise _Cancelled
        channel.progress("prefill", done, total, rid)

    responses = stream_generate(
        loaded.model,
        loaded.tokenizer,
        prompt,
        max_tokens=req.max_tokens,
        prompt_progress_callback=on_prefill,
        **options,
    )
    done = _Outcome(prompt_tokens=prompt_tokens, stops=StopFilter(req.stop))
    # closing(): a cancel or a stop sequence leaves the generator early; closing it unwinds
    # mlx-lm's wired limit.
    with contextlib.closing(responses):
        try:
            for response in responses:
                done.add(response, start, channel.send, rid)
                if done.stops.stopped:
                    break
                if inbox.is_cancelled(rid):
                    done.stop_reason = "cancelled"
                    break
        except _Cancelled:
            done.stop_reason = "cancelled"
    if done.stop_reason != "cancelled":
        done.flush(channel.send, rid)
    channel.send(runner_pb2.FromRunner(done=done.message(rid)))


@dataclass
class _Outcome:
    """What a generation has produced so far, for the Tokens it sends and the Done at its end."""

    prompt_tokens: int
    stops: StopFilter
    generation_tokens: int = 0
    unsent_tokens: int = 0  # tokens whose text is still held back (detokenizer, stop sequences)
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    stop_reason: str = ""

    def add(
        self, response: Any, start: float, send: Callable[[runner_pb2.FromRunner], None], rid: str
    ) -> None:
        if self.generation_tokens == 0:
            self.ttft_s = time.perf_counter() - start
        self.generation_tokens = int(response.generation_tokens)
        self.prompt_tokens = int(response.prompt_tokens)
        self.tokens_per_s = float(response.generation_tps)
        self.unsent_tokens += 1
        if response.finish_reason:
            self.stop_reason = str(response.finish_reason)
        self._send(self.stops.feed(response.text), send, rid)
        if self.stops.stopped:
            self.stop_reason = "stop"

    def flush(self, send: Callable[[runner_pb2.FromRunner], None], rid: str) -> None:
        """Send what the stop sequences still hold: the generation ended without one."""
        self._send(self.stops.flush(), send, rid)

    def _send(self, text: str, send: Callable[[runner_pb2.FromRunner], None], rid: str) -> None:
        # An empty segment (half a UTF-8 character, a space waiting for the next token, the
        # start of what may be a stop sequence) is not sent; its token is counted with the next
        # segment that carries text.
        if text:
            tokens = runner_pb2.Tokens(request_id=rid, text=text, count=self.unsent_tokens)
            send(runner_pb2.FromRunner(tokens=tokens))
            self.unsent_tokens = 0

    def message(self, rid: str) -> runner_pb2.Done:
        return runner_pb2.Done(
            request_id=rid,
            stop_reason=self.stop_reason or "length",
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            ttft_s=self.ttft_s,
            tokens_per_s=self.tokens_per_s,
        )


# --- the process ----------------------------------------------------------------------------


def arm_parent_death() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (the lifeline's second line).

    The signal follows the parent *thread* that spawned this process: the daemon must spawn
    runners from a thread that lives as long as it does (its event loop's).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


def hello_reply() -> runner_pb2.HelloReply:
    # Versions from the package metadata: importing MLX just to print them costs seconds.
    return runner_pb2.HelloReply(
        protocol_version=RUNNER_PROTOCOL_VERSION,
        pid=os.getpid(),
        mlx_version=_version("mlx"),
        mlx_lm_version=_version("mlx-lm"),
    )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def serve(channel: Channel, inbox: Inbox) -> int:
    """The runner's life after the pipe is up: handshake, load, requests. Returns the exit code."""
    first = inbox.next()
    if first.WhichOneof("msg") != "hello":
        channel.error("internal", "the daemon did not start with Hello: restart exod")
        return Exit.INTERNAL
    if first.hello.protocol_version != RUNNER_PROTOCOL_VERSION:
        channel.error(
            "internal",
            f"runner protocol {RUNNER_PROTOCOL_VERSION} cannot serve a daemon speaking "
            f"{first.hello.protocol_version}: reinstall exod so that both come from one version",
        )
        return Exit.INTERNAL
    channel.send(runner_pb2.FromRunner(hello=hello_reply()))
    threading.Thread(target=heartbeat, args=(channel,), name="heartbeat", daemon=True).start()

    msg = inbox.next()
    if msg.WhichOneof("msg") == "shutdown":
        return Exit.OK
    if msg.WhichOneof("msg") != "load":
        channel.error("internal", f"expected Load, got {msg.WhichOneof('msg')}: restart exod")
        return Exit.INTERNAL
    try:
        loaded = load(msg.load.model_path, channel)
    except ExoError as e:
        log.exception("load of %s failed (%s)", msg.load.model_path, e.reason)
        channel.error(e.reason, e.message)
        return REASONS[e.reason].exit
    ready = runner_pb2.Ready(
        context_length=loaded.context_length,
        has_chat_template=bool(loaded.tokenizer.has_chat_template),
        load_s=loaded.load_s,
    )
    channel.send(runner_pb2.FromRunner(ready=ready))
    log.info("loaded %s in %.2f s", msg.load.model_path, loaded.load_s)

    while True:
        msg = inbox.next()
        which = msg.WhichOneof("msg")
        if which == "generate":
            generate(msg.generate, loaded, channel, inbox)
        elif which == "shutdown":
            return Exit.OK
        else:
            log.warning("ignoring %s from the daemon: the model is loaded already", which)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m exod.runners.runner")
    parser.add_argument("--fd", type=int, required=True, help="this end of the runner pipe")
    parser.add_argument("--parent", type=int, default=0, help="the daemon's pid")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arm_parent_death()
    # The daemon may have died before the death signal was armed; then nobody would kill us.
    if args.parent and os.getppid() != args.parent:
        return Exit.UNAVAILABLE
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s runner[%(process)d] %(levelname)s %(message)s",
    )
    # The runner reads local files only; mlx-lm and transformers must never reach the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    sock = socket.socket(fileno=args.fd)
    inbox = Inbox(sock)
    threading.Thread(target=inbox.read_forever, name="pipe-reader", daemon=True).start()
    return serve(Channel(sock), inbox)


if __name__ == "__main__":
    sys.exit(main())
