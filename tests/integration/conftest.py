"""Fixtures for the integration tests: real exod processes on fresh homes, and the models they
run (written once per session by tests/models.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import models
from tests.daemon import Daemon

# A hung daemon or client fails its test within this many seconds, not after pytest's default.
TEST_TIMEOUT_S = 120


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def qwen2() -> Path:
    """A tiny qwen2 model with a chat template (random weights)."""
    return models.demo_model("qwen2")


@pytest.fixture(scope="session")
def llama() -> Path:
    """A tiny llama model with a chat template (random weights)."""
    return models.demo_model("llama")


def _end(made: list[Daemon]) -> None:
    """Stop each daemon; fail if any runner outlived its exod."""
    leaks = {}
    for d in made:
        leaked = d.cleanup()
        if leaked:
            leaks[str(d.home)] = leaked
        shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert not leaks, f"runners outlived exod: {leaks}"


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Daemons a test makes (and starts) itself; each is ended after the test."""
    made: list[Daemon] = []
    yield made
    _end(made)


@pytest.fixture
def exod(tmp_path: Path, daemon_factory: list[Daemon]) -> Daemon:
    """A running exod on a fresh home, for one test."""
    d = Daemon.create(tmp_path / "home")
    daemon_factory.append(d)
    return d.start()


@pytest.fixture(scope="module")
def shared_exod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A running exod shared by the tests of one module: only for tests that do not disturb
    each other (compare events after a seq taken at the test's start, not from the beginning)."""
    d = Daemon.create(tmp_path_factory.mktemp("shared") / "home")
    made = [d]
    d.start()
    yield d
    _end(made)
