"""The runner's main loop once the model is loaded: continuous batching on mlx-lm's BatchGenerator.

Between two steps of the batch the loop takes what the daemon sent (waiting for it only when
there is nothing to run): a Generate is encoded and checked at once (a refused one gets its
RunnerError and nobody else notices), then waits its turn in arrival order; up to Load.parallel
requests are in the BatchGenerator at once, each with its own sampler, max_tokens and prompt
cache. Each step's responses go to their requests: prefill progress, then tokens, and a Done for
each that ended (length, end of sequence, a stop sequence, Cancel), which leaves the batch and
gives its KV cache to the prompt cache for the requests that will extend it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from typing import Any

from exod.errors import Exit, ExoError
from exod.proto.exo.v1 import runner_pb2
from exod.runners.channel import Channel, Inbox, Stats
from exod.runners.load import Loaded, one_line
from exod.runners.prompt_cache import PromptCache
from exod.runners.requests import (
    Request,
    check_request,
    encode_prompt,
    make_sampler,
    prompt_ids,
    prompt_limit,
)

log = logging.getLogger("exod.runner")

# Cancels remembered for requests not seen yet (the daemon may give up on a request before the
# runner has read its Generate).
MAX_REMEMBERED_CANCELS = 1024


class BatchLoop:
    # A failed step fails the requests in it, and the loop goes on with a fresh generator; a
    # rank of a split model cannot (exod.runners.lockstep): its peers would step without it.
    contain_failures = True

    def __init__(
        self, loaded: Loaded, load: runner_pb2.Load, channel: Channel, inbox: Inbox, stats: Stats
    ) -> None:
        self.loaded = loaded
        self.parallel = max(1, load.parallel)
        self.channel = channel
        self.inbox = inbox
        self.stats = stats
        self.cache = PromptCache(load.prompt_cache_bytes)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # by the BatchGenerator's uid
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self.hold_s = load.stream_interval_s  # EXOD_STREAM_INTERVAL
        self.prefilling = False  # the last step prefilled: the next may too
        self.gen = self._new_generator()

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        eos = [[t] for t in self.loaded.tokenizer.eos_token_ids]
        return BatchGenerator(
            self.loaded.model,
            stop_tokens=eos,
            completion_batch_size=self.parallel,
            prefill_batch_size=self.parallel,
        )

    def run(self) -> int:
        """Serve until Shutdown; returns the exit code."""
        try:
            while True:
                busy = bool(self.running or self.waiting)
                msg = self.inbox.poll() if busy else self.inbox.next()
                while msg is not None:
                    if msg.WhichOneof("msg") == "shutdown":
                        return Exit.OK
                    self._handle(msg)
                    msg = self.inbox.poll()
                if self._admit() or self.prefilling:
                    self._flush_all()
                if self.running:
                    self._step()
                self._update_stats()
        finally:
            self.gen.close()

    # --- messages ---------------------------------------------------------------------------

    def _handle(self, msg: runner_pb2.ToRunner) -> None:
        which = msg.WhichOneof("msg")
        if which == "generate":
            self._accept(msg.generate)
        elif which == "cancel":
            self._cancel(msg.cancel.request_id)
        else:
            log.warning("ignoring %s from the daemon: the model is loaded already", which)

    def _accept(self, req: runner_pb2.Generate) -> None:
        request = self._admissible(req)
        if request is not None:
            self._enqueue(request)

    def _admissible(self, req: runner_pb2.Generate) -> Request | None:
        """The request, encoded and checked; None when refused (its RunnerError is sent, and
        nobody else notices)."""
        try:
            tokenizer = self.loaded.tokenizer
            _, count = encode_prompt(req, tokenizer)
            check_request(
                req, count, prompt_limit(self.loaded.context_length, req.max_prompt_tokens)
            )
            return Request(req, prompt_ids(req, tokenizer), tokenizer.detokenizer)
        except ExoError as e:
            self.channel.error(e.reason, e.message, req.request_id)
        except Exception as e:
            self._fail(req.request_id, e)
        return None

    def _enqueue(self, request: Request) -> None:
        """An accepted request waits its turn, unless it was cancelled before it came."""
        if request.rid in self.cancelled:
            del self.cancelled[request.rid]
            self._end(request, "cancelled")
            return
        self.waiting.append(request)

    def _cancel(self, rid: str) -> None:
        for uid, request in self.running.items():
            if request.rid == rid:
                kept = self.gen.remove([uid], return_prompt_caches=request.generation_tokens > 0)
                self._keep_cache(kept.get(uid))
                del self.running[uid]
                self._end(request, "cancelled")
                return
        for request in self.waiting:
            if request.rid == rid:
                self.waiting.remove(request)
                self._end(request, "cancelled")
                return
        self.cancelled[rid] = None
        while len(self.cancelled) > MAX_REMEMBERED_CANCELS:
            self.cancelled.popitem(last=False)

    # --- the batch --------------------------------------------------------------------------

    def _admit(self) -> bool:
        """Move waiting requests into the batch, oldest first, up to Load.parallel; true when
        any was moved (the next step prefills it)."""
        admitted = False
        while self.waiting and len(self.running) < self.parallel:
            request = self.waiting.popleft()
            try:
                cache, cached = self._fetch_cache(request.prompt)
                (uid,) = self.gen.insert(
                    [request.prompt[cached:]],
                    max_tokens=[request.req.max_tokens],
                    caches=[cache],
                    all_tokens=[request.prompt[:cached]],
                    samplers=[make_sampler(request.req)],
                )
            except Exception as e:
                if not self.contain_failures:
                    raise
                self._fail(request.rid, e)
                continue
            request.cached_tokens = cached
            request.hold_s = self.hold_s
            self.running[uid] = request
            admitted = True
            self.stats.prompt_tokens += len(request.prompt)
            self.stats.cached_prompt_tokens += cached
        return admitted

    def _step(self) -> None:
        try:
            prompt_responses, responses = self.gen.next()
            self.prefilling = bool(prompt_responses)
        except Exception as e:
            if not self.contain_failures:
                raise
            # A step is everyone's: all of them fail, and a fresh generator serves the next.
            log.exception("a batch step failed")
            for failed in self.running.values():
                self._fail(failed.rid, e)
            self.running.clear()
            self.gen.close()
            self.gen = self._new_generator()
            return
        for p in prompt_responses:
            prefilling = self.running.get(p.uid)
            if prefilling is not None:
                done, total = p.progress
                base = prefilling.cached_tokens
                self.channel.progress("prefill", base + done, base + total, prefilling.rid)
        for r in responses:
            request = self.running.get(r.uid)
            if request is None:
                continue
            try:
                self._route(r, request)
            except Exception as e:
                self.running.pop(r.uid, None)
                if r.finish_reason is None:
                    self.gen.remove([r.uid])
                self._fail(request.rid, e)

    def _route(self, r: Any, request: Request) -> None:
        """One token of one request: its text, and its end if it ended."""
        request.add(int(r.token), r.finish_reason, self.channel.send)
        if r.finish_reason is not None:  # the generator has let it go already
            self._keep_cache((r.prompt_cache, r.all_tokens))
        elif request.stops.stopped:
            kept = self.gen.remove([r.uid], return_prompt_caches=True)
            self._keep_cache(kept.get(r.uid))
        else:
            return
        del self.running[r.uid]
        self._end(request)

    def _end(self, request: Request, stop_reason: str = "") -> None:
        """The request's last text, then its Done."""
        request.flush(self.channel.send)
        self.channel.send(request.done(stop_reason))

    def _flush_all(self) -> None:
        """Send all held text: the next step prefills, which may take seconds."""
        for request in self.running.values():
            request.flush(self.channel.send)

    def _fetch_cache(self, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """The cache a request starts from, and how many of its prompt tokens that covers."""
        return self.cache.fetch(prompt)

    def _keep_cache(self, kept: tuple[list[Any], list[int]] | None) -> None:
        if kept is None:
            return
        cache, tokens = kept
        try:
            self.cache.insert(list(tokens), cache)
        except Exception:  # losing a cache entry costs time, never a request
            log.exception("keeping a prompt cache failed")

    def _fail(self, rid: str, e: Exception) -> None:
        log.error("generation %s failed: %s", rid, one_line(e), exc_info=e)
        self.channel.error("internal", f"generation failed: {one_line(e)}; see the runner log", rid)

    def _update_stats(self) -> None:
        self.stats.active = len(self.running)
        self.stats.prompt_cache_bytes = self.cache.nbytes
