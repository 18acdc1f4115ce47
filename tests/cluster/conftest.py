"""The cluster tests get the integration tests' per-test timeout (tests/integration/conftest.py)
also when run on their own: a hung probe or exod fails its test, not the whole run."""

from __future__ import annotations

from pathlib import Path

import pytest

TEST_TIMEOUT_S = 120  # as tests/integration/conftest.py
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))
