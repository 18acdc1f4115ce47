"""The batching settings: EXOD_PARALLEL, and the two caches bounded in bytes or as a share of the
runner memory cap (EXOD_PROMPT_CACHE_BYTES, EXOD_MLX_CACHE_LIMIT)."""

from __future__ import annotations

import pytest

from exod import config

ENV = {"HOME": "/h", "EXOD_MAX_RUNNER_MEMORY": "8G"}
GIB = 1 << 30


def test_defaults_four_at_once_a_quarter_and_a_tenth_of_the_cap() -> None:
    s = config.load({}, ENV)
    assert s.parallel == 4
    assert s.prompt_cache_bytes == 2 * GIB
    assert s.mlx_cache_limit == int(8 * GIB * 0.10)


def test_the_shares_follow_the_cap_however_it_was_given() -> None:
    s = config.load({"max_runner_memory": "1G"}, ENV)
    assert (s.prompt_cache_bytes, s.mlx_cache_limit) == (GIB // 4, int(GIB * 0.10))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),  # off
        ("0%", 0),
        ("512M", 512 << 20),
        ("1073741824", GIB),
        ("50%", 4 * GIB),
        ("100%", 8 * GIB),
        (" 12.5 % ", GIB),
    ],
)
def test_a_cache_bound_is_bytes_or_a_share_of_the_cap(text: str, expected: int) -> None:
    s = config.load({}, {**ENV, "EXOD_PROMPT_CACHE_BYTES": text, "EXOD_MLX_CACHE_LIMIT": text})
    assert (s.prompt_cache_bytes, s.mlx_cache_limit) == (expected, expected)


@pytest.mark.parametrize(
    ("name", "env", "value"),
    [
        ("prompt_cache_bytes", "EXOD_PROMPT_CACHE_BYTES", "lots"),
        ("prompt_cache_bytes", "EXOD_PROMPT_CACHE_BYTES", "101%"),
        ("mlx_cache_limit", "EXOD_MLX_CACHE_LIMIT", "-1"),
        ("mlx_cache_limit", "EXOD_MLX_CACHE_LIMIT", "%"),
    ],
)
def test_a_bad_cache_bound_names_the_setting_and_what_is_accepted(
    name: str, env: str, value: str
) -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.load({}, {**ENV, env: value})
    assert str(raised.value) == (
        f"invalid {env} {value!r}: expected a size such as 2G, 512M or 1073741824 (bytes), "
        "0 for none, or a percentage of EXOD_MAX_RUNNER_MEMORY from 0 to 100, such as 25%"
    )
    with pytest.raises(config.ConfigError, match=f"^invalid --{name.replace('_', '-')} "):
        config.load({name: value}, ENV)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_parallel_is_a_whole_number_from_one(value: str) -> None:
    with pytest.raises(config.ConfigError, match=r"^invalid EXOD_PARALLEL .*1 or more"):
        config.load({}, {**ENV, "EXOD_PARALLEL": value})
    assert config.load({"parallel": "8"}, ENV).parallel == 8
