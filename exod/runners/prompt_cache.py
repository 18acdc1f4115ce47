"""Prompt-cache reuse: the KV caches of finished requests, kept for the requests that extend them.

mlx-lm's own LRUPromptCache holds them in a trie of token sequences, bounded in bytes
(Load.prompt_cache_bytes): the next turn of a conversation, whose prompt is the last turn's
prompt and answer and more, or a request sharing a system prompt with an earlier one, starts
from a copy of the longest cached match (trimmed back to the common prefix) and prefills only
the rest. The copy is the request's own KV cache from then on, so it counts with the request's
memory, not the cache's. Everything is dropped when the runner ends.
"""

from __future__ import annotations

from typing import Any

# One model per runner: the trie's model key is a constant.
MODEL_KEY = "model"
# The bound is in bytes; the count of sequences must never be what evicts.
MAX_SEQUENCES = 1 << 30


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.max_bytes = max_bytes
        self._lru: Any = LRUPromptCache(max_size=MAX_SEQUENCES, max_bytes=max(max_bytes, 0))

    @property
    def nbytes(self) -> int:
        return int(self._lru.nbytes)

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the cache for the longest cached prefix of `tokens`, and that prefix's length.

        At least the last token is always left to prefill: its logits give the first new token.
        (None, 0) when nothing cached helps.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if self.max_bytes <= 0 or len(tokens) < 2:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(MODEL_KEY, tokens)
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt is cached: step back one token
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        return list(cache), len(tokens) - len(rest)

    def insert(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep a finished request's cache (of exactly `tokens`), evicting the least recent."""
        import mlx.core as mx

        if self.max_bytes <= 0 or not tokens or not cache:
            return
        # Materialize it now: the extracted cache is a lazy slice of the batch's big arrays,
        # which would otherwise stay alive through it.
        mx.eval([c.state for c in cache])
        self._lru.insert_cache(MODEL_KEY, list(tokens), cache)
