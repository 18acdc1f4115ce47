"""The model registry: names for model directories, kept in the event log across restarts."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
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


def test_a_registered_name_is_replaced_only_with_force(
    exod: Daemon, qwen2: Path, llama: Path
) -> None:
    exod.ok("models", "add", "tiny", str(qwen2))
    taken = exod.exoctl("models", "add", "tiny", str(llama))
    assert (taken.code, taken.stdout, taken.stderr) == (
        64,
        b"",
        f"exoctl: the name 'tiny' is already registered to {qwen2}: choose another name, or "
        f"replace it with `exoctl models add tiny {llama} --force`.\n",
    )
    (listed,) = exod.ok("models", "list", "--json").json_lines()
    assert [m["path"] for m in listed["models"]] == [str(qwen2)]
    # The same directory again is no replacement: it is accepted.
    assert exod.ok("models", "add", "tiny", str(qwen2)).text == f"added tiny: {qwen2}\n"
    assert exod.ok("models", "add", "tiny", str(llama), "--force").text == f"added tiny: {llama}\n"
    (listed,) = exod.ok("models", "list", "--json").json_lines()
    assert [m["path"] for m in listed["models"]] == [str(llama)]


def test_the_demo_model_does_not_take_a_registered_name(exod: Daemon, qwen2: Path) -> None:
    exod.ok("models", "add", "demo", str(qwen2))
    taken = exod.exoctl("models", "demo")
    assert (taken.code, taken.stderr) == (
        64,
        f"exoctl: the name 'demo' is already registered to {qwen2}: choose another name with "
        "`exoctl models demo --name NAME`, or replace it with "
        "`exoctl models demo --name demo --force`.\n",
    )
    demo = exod.home / "models" / "demo"
    assert not demo.exists()  # no model written that would not be registered
    assert exod.ok("models", "demo", "--force").text.startswith(
        f"registered demo model demo: {demo}\n"
    )
    exod.ok("models", "demo")  # again, to the same directory: fine


def test_a_bare_word_that_names_a_directory_here_suggests_the_path(
    exod: Daemon, qwen2: Path, tmp_path: Path
) -> None:
    here = tmp_path / "here"
    shutil.copytree(qwen2, here / "tiny")

    def run_here(model: str) -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable, "-m", "exoctl", "run", model, PROMPT, "--max-tokens", "4"]
        return subprocess.run(
            command, cwd=here, env=exod.base_env(), capture_output=True, check=False
        )

    result = run_here("tiny")
    assert (result.returncode, result.stdout, result.stderr.decode()) == (
        66,
        b"",
        "exoctl: model 'tiny' not found (a bare word is a registered name, never a directory). "
        "to run the directory tiny here, write `exoctl run ./tiny`\n",
    )
    # What it says works.
    result = run_here("./tiny")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected(qwen2, PROMPT, 4, chat=True).stdout


def test_names_with_capitals_are_refused_with_the_lowercase_name(exod: Daemon, qwen2: Path) -> None:
    for args in (
        ("models", "add", "Tiny", str(qwen2)),
        ("models", "rm", "Tiny"),
        ("run", "Tiny", PROMPT),
    ):
        result = exod.exoctl(*args)
        assert (result.code, result.stderr) == (
            64,
            "exoctl: model names are lowercase, and 'Tiny' is not. did you mean 'tiny'?\n",
        ), args
