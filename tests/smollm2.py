"""The real model of the tests: SmolLM2-135M-Instruct's Q4_1 GGUF, when it is cached.

tools/smollm2.py fetches it (`python tools/smollm2.py`, once, with the network). Tests that need it
skip with that instruction when it is not cached, or fail when EXOD_REQUIRE_SMOLLM2=1 (a run
that must prove the real-model checks, such as CI with the cache restored).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.smollm2 import cached_path


def smollm2_gguf() -> Path:
    """The cached GGUF's path; skips (or fails, under EXOD_REQUIRE_SMOLLM2=1) without it."""
    path = cached_path()
    if path is None:
        reason = "SmolLM2's GGUF is not cached: run `python tools/smollm2.py` once (it downloads)"
        if os.environ.get("EXOD_REQUIRE_SMOLLM2") == "1":
            pytest.fail(f"EXOD_REQUIRE_SMOLLM2=1 but {reason}")
        pytest.skip(reason)
    return path
