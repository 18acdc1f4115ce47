"""EXOD_MODEL_CACHE_BYTES: bytes, or a share of the disk that holds EXOD_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exod import config

ENV = {"HOME": "/h"}


def test_the_default_is_a_quarter_of_the_disk_that_will_hold_the_home(tmp_path: Path) -> None:
    home = tmp_path / "not" / "made" / "yet"
    disk = os.statvfs(tmp_path)
    assert config.disk_size(home) == disk.f_blocks * disk.f_frsize
    assert config.load({"home": str(home)}, ENV).model_cache_bytes == config.disk_size(home) // 4


@pytest.mark.parametrize(
    ("value", "expected"), [("200G", 200 << 30), ("512M", 512 << 20), ("0", 0)]
)
def test_a_size_in_bytes(value: str, expected: int) -> None:
    assert config.load({}, {**ENV, "EXOD_MODEL_CACHE_BYTES": value}).model_cache_bytes == expected


def test_a_percentage_of_the_disk(tmp_path: Path) -> None:
    s = config.load({"home": str(tmp_path), "model_cache_bytes": "10%"}, ENV)
    assert s.model_cache_bytes == int(config.disk_size(tmp_path) * 0.1)


@pytest.mark.parametrize("value", ["lots", "150%", "-1G", "1X"])
def test_anything_else_says_what_is_expected(value: str) -> None:
    with pytest.raises(config.ConfigError) as refused:
        config.load({}, {**ENV, "EXOD_MODEL_CACHE_BYTES": value})
    assert str(refused.value) == (
        f"invalid EXOD_MODEL_CACHE_BYTES {value!r}: expected a size such as 200G, 512M or "
        "1073741824 (bytes), 0 for none, or a percentage of the disk that holds EXOD_HOME from "
        "0 to 100, such as 25%"
    )
