from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.cleanup()
        shutil.rmtree(d.socket.parent, ignore_errors=True)


@pytest.fixture
def exod(tmp_path: Path, daemon_factory: list[Daemon]) -> Daemon:
    """A running exod on a fresh home."""
    d = Daemon.create(tmp_path / "home")
    daemon_factory.append(d)
    return d.start()
