"""The batch loop of one rank of a split model: every rank steps the same batch, in lockstep.

mlx-lm's pipeline passes each step's activations from rank to rank, so every rank must run the
same BatchGenerator steps on the same requests in the same order. Rank 0 (the leader) alone
reads Generate and Cancel from the daemon: before each step it encodes and checks what came
(refusals are answered at once and go no further), fixes a seed for a sampled request that has
none (every rank must draw the same tokens), and shares the rest with every other rank as a
RingStep (exod.runners.ring). Every rank then applies that step the same way: the requests join
the queue in order, the cancellations leave; admission, stop sequences and ends then play out
identically everywhere, since every rank computes the same tokens. Only rank 0 streams Tokens,
Done and prefill progress to its daemon; the others follow silently, and take from their own
pipe only Shutdown.

Whatever would differ between ranks is made the same: rank 0's Load.parallel for everyone, and
a prompt-cache hit only as long as every rank has cached (each keeps its own layers' cache, and
their byte bounds may evict differently). A rank whose step fails cannot go on alone: the
runner ends, `rank_failed` when the ring broke (a peer died: MLX fails the ring within about a
second), `internal` otherwise; its peers then see their ring break and end too.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Any, NoReturn

from exod.errors import Exit, ExoError
from exod.proto.exo.v1 import runner_pb2
from exod.runners.batch import BatchLoop
from exod.runners.channel import Channel, Inbox, Stats
from exod.runners.load import Loaded, one_line
from exod.runners.requests import Request
from exod.runners.ring import Ring, is_ring_failure, rank_failed

log = logging.getLogger("exod.runner")

# An idle leader shares an empty step this often: its followers' ring (and its own) would
# otherwise notice a dead peer only at the next request.
KEEPALIVE_S = 1.0
SEED_BITS = 63  # Generate.seed is an int64


class Silent(Channel):
    """A follower's view of the pipe for its requests: rank 0 alone answers for them."""

    def __init__(self) -> None:
        pass

    def send(self, msg: runner_pb2.FromRunner) -> None:
        pass


class RankLoop(BatchLoop):
    contain_failures = False  # a failed step ends the runner: its peers cannot step without it

    def __init__(
        self,
        loaded: Loaded,
        load: runner_pb2.Load,
        channel: Channel,
        inbox: Inbox,
        stats: Stats,
        *,
        ring: Ring,
    ) -> None:
        self.ring = ring
        agreed = runner_pb2.Load()
        agreed.CopyFrom(load)
        try:
            (agreed.parallel,) = ring.from_leader([max(1, load.parallel)])
        except RuntimeError as e:
            if not is_ring_failure(e):
                raise
            ring.end(rank_failed(ring.rank, e))
        super().__init__(loaded, agreed, channel if ring.leader else Silent(), inbox, stats)
        if ring.leader:
            ring.end.owed = self._owed
        else:
            threading.Thread(target=self._watch_pipe, name="pipe-watch", daemon=True).start()

    def run(self) -> int:
        """Step with the other ranks until rank 0 is told to stop; returns the exit code."""
        try:
            while True:
                step = self._next_step()
                if step.shutdown:
                    self.gen.close()
                    return Exit.OK
                self._apply(step)
                if self._admit() or self.prefilling:
                    self._flush_all()
                if self.running:
                    self._step()
                self._update_stats()
        except Exception as e:
            self._end_rank(e)

    # --- what every rank steps on ----------------------------------------------------------

    def _next_step(self) -> runner_pb2.RingStep:
        import mlx.core as mx

        step = self._from_daemon() if self.ring.leader else runner_pb2.RingStep()
        # The next forward pass may still be running, its own collectives with it: the share
        # comes after them on every rank (exod.runners.ring.Ring).
        mx.synchronize(self.gen.stream)
        return self.ring.share(step)

    def _from_daemon(self) -> runner_pb2.RingStep:
        """Rank 0: what the daemon sent since the last step, checked, as the step to share."""
        step = runner_pb2.RingStep()
        busy = bool(self.running or self.waiting)
        msg = self.inbox.poll() if busy else self.inbox.wait(KEEPALIVE_S)
        while msg is not None:
            which = msg.WhichOneof("msg")
            if which == "shutdown":
                step.shutdown = True
                break
            if which == "generate":
                request = self._admissible(seeded(msg.generate))
                if request is not None:
                    shared = runner_pb2.RingRequest(generate=request.req, prompt=request.prompt)
                    step.events.add(generate=shared)
            elif which == "cancel":
                step.events.add(cancel=msg.cancel.request_id)
            else:
                log.warning("ignoring %s from the daemon: the model is loaded already", which)
            msg = self.inbox.poll()
        return step

    def _apply(self, step: runner_pb2.RingStep) -> None:
        tokenizer = self.loaded.tokenizer
        for event in step.events:
            if event.WhichOneof("event") == "generate":
                shared = event.generate
                self._enqueue(Request(shared.generate, list(shared.prompt), tokenizer.detokenizer))
            else:
                self._cancel(event.cancel)

    def _fetch_cache(self, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """The prompt-cache hit every rank has: the shortest of theirs."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, cached = self.cache.fetch(prompt)
        if cache is not None and not can_trim_prompt_cache(cache):
            cache, cached = None, 0  # it could not be cut back to a shorter peer's hit
        (agreed,) = self.ring.agree_min([cached])
        if cache is None or agreed == 0:
            return None, 0
        if agreed < cached:
            trim_prompt_cache(cache, cached - agreed)
        return cache, agreed

    # --- ends -------------------------------------------------------------------------------

    def _end_rank(self, e: Exception) -> NoReturn:
        """The ring broke, or a step failed here: every request fails, then the runner ends."""
        if is_ring_failure(e):
            self.ring.end(rank_failed(self.ring.rank, e))
        log.exception("rank %d failed", self.ring.rank.rank)
        self.ring.end(
            ExoError("internal", f"a batch step failed: {one_line(e)}; see the runner log")
        )

    def _owed(self) -> list[str]:
        """The requests rank 0 answers for, to fail when the ring does."""
        return [r.rid for r in [*self.running.values(), *self.waiting]]

    def _watch_pipe(self) -> None:
        """A follower's pipe: only Shutdown matters (its requests come from rank 0). It may come
        while the main thread waits on the ring, so it is acted on here, at once."""
        while True:
            msg = self.inbox.next()
            which = msg.WhichOneof("msg")
            if which == "shutdown":
                log.info("rank %d stopping as the daemon asked", self.ring.rank.rank)
                # Nothing to save; the main thread may be inside a ring call that only a peer
                # can end.
                os._exit(Exit.OK)
            log.warning("rank %d ignores %s: rank 0 takes the requests", self.ring.rank.rank, which)


def seeded(req: runner_pb2.Generate) -> runner_pb2.Generate:
    """The request with a seed of its own when it samples: every rank then draws the same tokens
    (an unseeded sampler draws from MLX's global state, which differs between processes)."""
    if req.temperature <= 0 or req.has_seed:
        return req
    fixed = runner_pb2.Generate()
    fixed.CopyFrom(req)
    fixed.has_seed = True
    fixed.seed = secrets.randbits(SEED_BITS)
    return fixed
