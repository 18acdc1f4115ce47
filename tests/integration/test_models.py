"""The model registry: names for model directories, kept in the event log across restarts."""

from __future__ import annotations

import signal
from pathlib import Path

from tests import models
from tests.daemon import Daemon
from tests.reference import expected

PROMPT = "Hello"


def test_registered_name_runs_survives_restart_and_can_be_removed(
    exod: Daemon, qwen2: Path
) -> None:
    added = exod.exoctl("models", "add", "tiny", str(qwen2))
    assert added.code == 0, added
    want = expected(qwen2, PROMPT, 12, chat=True).stdout
    by_name = exod.exoctl("run", "tiny", PROMPT, "--max-tokens", "12")
    assert by_name.code == 0, by_name
    assert by_name.stdout == want
    (listed,) = exod.ok("models", "list", "--json").json_lines()
    (entry,) = listed["models"]
    assert entry["name"] == "tiny"
    assert entry["path"] == str(qwen2)
    assert entry["content_hash"]

    assert exod.stop(signal.SIGTERM) == 0
    exod.start()
    assert exod.ok("models", "list", "--json").json_lines() == [listed]
    again = exod.exoctl("run", "tiny", PROMPT, "--max-tokens", "12")
    assert again.code == 0, again
    assert again.stdout == want

    assert exod.exoctl("models", "rm", "tiny").code == 0
    gone = exod.exoctl("run", "tiny", PROMPT, "--max-tokens", "12")
    assert gone.code == 66, gone
    assert exod.ok("models", "list", "--json").json_lines() == [{"models": []}]
    assert exod.exoctl("models", "rm", "tiny").code == 66
    # The removal is kept too.
    assert exod.stop(signal.SIGTERM) == 0
    exod.start()
    assert exod.exoctl("run", "tiny", PROMPT).code == 66


def test_models_add_checks_its_arguments(exod: Daemon, tmp_path: Path) -> None:
    assert exod.exoctl("models", "add", "Bad Name!", str(tmp_path)).code == 64
    assert exod.exoctl("models", "add", "nowhere", str(tmp_path / "absent")).code == 66
    assert exod.exoctl("models", "add", "broken", str(models.config_not_json())).code == 65
    assert exod.ok("models", "list", "--json").json_lines() == [{"models": []}]


def test_demo_model_runs(exod: Daemon) -> None:
    demo = exod.exoctl("models", "demo")
    assert demo.code == 0, demo
    result = exod.exoctl("run", "demo", PROMPT)
    assert result.code == 0, result
    assert result.stdout.endswith(b"\n")
    assert result.stdout.strip()
    (listed,) = exod.ok("models", "list", "--json").json_lines()
    (entry,) = listed["models"]
    assert entry["name"] == "demo"
    assert result.stdout == expected(Path(entry["path"]), PROMPT, 256, chat=True).stdout
