"""One request in the runner: its prompt, its sampler, and what it has produced so far.

A Generate becomes token ids by encode_prompt's rules (chat template, raw, messages), is checked
by check_request, and gets a sampler of its own. While it runs, a Request turns each token the
batch gives it into text with its own streaming detokenizer (the same one stream_generate uses,
so that the text is exactly mlx_lm.generate's), holds back what may be a stop sequence, and
builds the Tokens and the Done the daemon gets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exod.errors import ExoError
from exod.proto.exo.v1 import runner_pb2
from exod.runners.load import one_line
from exod.runners.stops import StopFilter

Send = Callable[[runner_pb2.FromRunner], None]
Sampler = Callable[[Any], Any]  # mx.array of log-probabilities (1 or B rows) -> token ids


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
    """The prompt as stream_generate would get it, and its length in tokens.

    A raw prompt stays a string, encoded as mlx_lm.generate encodes one (prompt_ids). A prompt
    goes through the chat template unless it is raw or the model has none (mlx_lm.generate's
    rule). A conversation (`messages`) follows the same rule, so that `exoctl run` and
    /v1/chat/completions agree: a lone user message to a model without a template goes as it
    is, like a prompt; several messages are refused, since without a template there is no right
    way to join them.
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
    return prompt, len(raw_ids(prompt, tokenizer))


def raw_ids(prompt: str, tokenizer: Any) -> list[int]:
    """stream_generate's encoding of a string: a BOS unless the text starts with one."""
    bos = tokenizer.bos_token
    add_special_tokens = bos is None or not prompt.startswith(bos)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))


def prompt_ids(req: runner_pb2.Generate, tokenizer: Any) -> list[int]:
    """The request's prompt as token ids (encode_prompt's rules)."""
    prompt, _ = encode_prompt(req, tokenizer)
    return raw_ids(prompt, tokenizer) if isinstance(prompt, str) else prompt


def make_sampler(req: runner_pb2.Generate) -> Sampler:
    """The request's own sampler: greedy, sampled from MLX's global state, or seeded.

    A seeded request draws from a key of its own, split once per token exactly as MLX splits
    its global key after mx.random.seed(seed): alone or beside others in a batch, it draws the
    same tokens as mlx_lm.generate after mx.random.seed(seed), and reseeds no one else.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import greedy_sampler
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    if req.temperature <= 0:
        # The one greedy function for everyone: a batch whose samplers are all the same one
        # samples in one call.
        return greedy_sampler
    if not req.has_seed:
        return mlx_make_sampler(temp=req.temperature)
    scale = 1.0 / req.temperature
    key = mx.random.key(req.seed)

    def seeded(logprobs: Any) -> Any:
        nonlocal key
        key, subkey = mx.random.split(key)
        return mx.random.categorical(logprobs * scale, key=subkey)

    return seeded


@dataclass
class Request:
    """A request that was accepted: in the runner's queue, prefilling or decoding."""

    req: runner_pb2.Generate
    prompt: list[int]
    detokenizer: Any  # mlx-lm's streaming detokenizer, a copy of the tokenizer's own
    received: float = field(default_factory=time.perf_counter)
    cached_tokens: int = 0
    stops: StopFilter = field(init=False)
    generation_tokens: int = 0
    unsent_tokens: int = 0  # tokens whose text is still held back (detokenizer, stop sequences)
    first_token_at: float = 0.0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    stop_reason: str = ""
    # Text ready but held for the next frame (see hold_s), and when the last frame went out.
    held: list[str] = field(default_factory=list)
    sent_at: float = 0.0
    hold_s: float = 0.0

    def __post_init__(self) -> None:
        self.stops = StopFilter(list(self.req.stop))

    @property
    def rid(self) -> str:
        return self.req.request_id

    def add(self, token: int, finish_reason: str | None, send: Send) -> None:
        """One token from the batch, as stream_generate treats it: an end-of-sequence token
        ends the text without being part of it; the last one is finalized."""
        now = time.perf_counter()
        if self.generation_tokens == 0:
            self.ttft_s = now - self.received
            self.first_token_at = now
        self.generation_tokens += 1
        self.unsent_tokens += 1
        self.tokens_per_s = self.generation_tokens / max(now - self.first_token_at, 1e-9)
        if finish_reason != "stop":
            self.detokenizer.add_token(token)
        if finish_reason is not None:
            self.detokenizer.finalize()
            self.stop_reason = finish_reason
        self._send(self.stops.feed(self.detokenizer.last_segment), send)
        if self.stops.stopped:
            self.stop_reason = "stop"
        elif finish_reason is not None:
            self._send(self.stops.flush(), send)  # ended without a stop sequence

    def _send(self, text: str, send: Send) -> None:
        # An empty segment (half a UTF-8 character, a space waiting for the next token, the
        # start of what may be a stop sequence) is not sent; its token is counted with the next
        # segment that carries text. Text goes out at once when nothing was sent for hold_s (the
        # first text always), else it waits for the next frame: when a step takes a few
        # milliseconds, one frame per token would cost the daemon and the client more than the
        # step itself (docs/architecture.md, "The token path").
        if not text:
            return
        self.held.append(text)
        if time.perf_counter() - self.sent_at >= self.hold_s:
            self.flush(send)

    def flush(self, send: Send) -> None:
        """Send the held text now (the request ends, or the batch is about to prefill)."""
        if not self.held:
            return
        text = "".join(self.held)
        self.held.clear()
        tokens = runner_pb2.Tokens(request_id=self.rid, text=text, count=self.unsent_tokens)
        send(runner_pb2.FromRunner(tokens=tokens))
        self.unsent_tokens = 0
        self.sent_at = time.perf_counter()

    def done(self, stop_reason: str = "") -> runner_pb2.FromRunner:
        """The Done of this request (after flush: it ends the request's text)."""
        done = runner_pb2.Done(
            request_id=self.rid,
            stop_reason=stop_reason or self.stop_reason or "length",
            prompt_tokens=len(self.prompt),
            generation_tokens=self.generation_tokens,
            ttft_s=self.ttft_s,
            tokens_per_s=self.tokens_per_s,
            cached_tokens=self.cached_tokens,
        )
        return runner_pb2.FromRunner(done=done)
