"""The runner's prompt cache: which cached KV a new prompt starts from, and its byte bound."""

from __future__ import annotations

from typing import Any

from exod.runners.prompt_cache import PromptCache

LAYERS = 2


def _kv(tokens: int) -> list[Any]:
    """A model's KV cache (two layers) holding `tokens` tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    cache = []
    for _ in range(LAYERS):
        layer: Any = KVCache()  # type: ignore[no-untyped-call]  # mlx-lm leaves it unannotated
        layer.update_and_fetch(mx.ones((1, 2, tokens, 8)), mx.ones((1, 2, tokens, 8)))
        cache.append(layer)
    return cache


def _sizes(cache: list[Any] | None) -> list[int]:
    assert cache is not None
    return [layer.offset for layer in cache]


def test_a_prompt_that_extends_a_cached_one_starts_from_a_copy_of_it() -> None:
    pc = PromptCache(1 << 30)
    pc.insert(list(range(10)), _kv(10))
    cache, cached = pc.fetch([*range(10), 50, 51])
    assert cached == 10
    assert _sizes(cache) == [10] * LAYERS
    cache, cached = pc.fetch([*range(10), 60])  # the copy taken before left the entry whole
    assert cached == 10


def test_a_prompt_that_diverges_reuses_the_common_prefix_only() -> None:
    pc = PromptCache(1 << 30)
    pc.insert(list(range(10)), _kv(10))
    cache, cached = pc.fetch([0, 1, 2, 3, 4, 99, 98])
    assert cached == 5
    assert _sizes(cache) == [5] * LAYERS


def test_the_whole_prompt_cached_leaves_its_last_token_to_prefill() -> None:
    pc = PromptCache(1 << 30)
    pc.insert(list(range(10)), _kv(10))
    cache, cached = pc.fetch(list(range(10)))
    assert cached == 9
    assert _sizes(cache) == [9] * LAYERS


def test_nothing_in_common_or_the_cache_off_gives_nothing() -> None:
    pc = PromptCache(1 << 30)
    pc.insert(list(range(10)), _kv(10))
    assert pc.fetch([100, 101, 102]) == (None, 0)
    off = PromptCache(0)
    off.insert(list(range(10)), _kv(10))
    assert off.nbytes == 0
    assert off.fetch(list(range(12))) == (None, 0)


def test_the_bound_in_bytes_evicts_the_least_recent() -> None:
    one = sum(layer.nbytes for layer in _kv(10))
    pc = PromptCache(2 * one)
    for start in (0, 100, 200):
        pc.insert(list(range(start, start + 10)), _kv(10))
    assert pc.nbytes == 2 * one
    assert pc.fetch(list(range(12))) == (None, 0)  # the oldest went
    assert pc.fetch(list(range(200, 212)))[1] == 10
