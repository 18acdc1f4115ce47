"""`exoctl models add NAME FILE.gguf` and `ollama:MODEL[:TAG]`, end to end: the real exod converts
in a supervised subprocess, registers a directory of its own, and `exoctl run` then generates what
mlx-lm generates from that directory. Every failure has its exit code and leaves nothing behind:
no directory in HOME/models, no entry in `models list`, no process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from gguf import GGMLQuantizationType as T

from exod.models.inspect import content_hash
from tests.daemon import Daemon, LineReader, Result, pids_alive, stderr_of, wait_until
from tests.faults import WRAPPER, arm_wrapper, wrapper_children
from tests.gguf_files import TinyGGUF, write_tiny_gguf
from tests.reference import expected

PROMPT = "Hello"
SLOW = Path(__file__).resolve().parents[1] / "gguf_slow.py"
CANCELLED_LINE = "exoctl: interrupted; the import was cancelled and nothing was kept.\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", weight_type=T.Q8_0)


def models_dir(d: Daemon) -> list[str]:
    """What HOME/models holds, hidden work directories included."""
    folder = d.home / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def registered(d: Daemon) -> list[dict[str, Any]]:
    (listed,) = d.ok("models", "list", "--json").json_lines()
    models: list[dict[str, Any]] = listed["models"]
    return models


def converters(d: Daemon) -> list[int]:
    """Live processes of this exod's imports (the shim, a wrapper, the converter)."""
    found = []
    for proc in psutil.process_iter(["pid", "environ", "status"]):
        try:
            env = proc.info["environ"] or {}
            ours = env.get("EXOD_HOME") == str(d.home)
            importing = env.get("EXOD_RUNNER_ID", "").startswith("import-")
            if ours and importing and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def assert_left_nothing(d: Daemon) -> None:
    assert models_dir(d) == []
    assert registered(d) == []
    assert wait_until(lambda: not converters(d), timeout=5.0), converters(d)


def assert_refused(result: Result, code: int, *words: str) -> None:
    assert result.code == code, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("exoctl: "), result
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result


def test_import_runs_as_mlx_lm_and_rm_deletes_it(exod: Daemon, tiny: TinyGGUF) -> None:
    result = exod.exoctl("models", "add", "tiny", str(tiny.path), "--json")
    assert result.code == 0, result
    *progress, done = result.json_lines()
    dest = exod.home / "models" / "tiny"
    assert done["type"] == "done"
    assert {k: done[k] for k in ("name", "path", "owned", "stop")} == {
        "name": "tiny",
        "path": str(dest),
        "owned": True,
        "stop": [],
    }
    assert progress and all(p["type"] == "progress" for p in progress)
    assert progress[-1]["tensors_done"] == progress[-1]["tensors_total"] == 20
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"] > 0
    assert models_dir(exod) == ["tiny"]
    (entry,) = registered(exod)
    assert entry["content_hash"] == done["content_hash"] == content_hash(dest)

    ran = exod.exoctl("run", "tiny", PROMPT, "--max-tokens", "12")
    assert ran.code == 0, ran
    assert ran.stdout == expected(dest, PROMPT, 12, chat=True).stdout

    removed = exod.exoctl("models", "rm", "tiny")
    assert removed.code == 0, removed
    assert removed.text == f"removed tiny and deleted {dest}\n"
    assert_left_nothing(exod)


def test_plain_output_and_a_split_set(exod: Daemon, tmp_path: Path) -> None:
    split = write_tiny_gguf(
        tmp_path / "s.gguf", arch="qwen2", weight_type=T.Q4_1, split_max_tensors=7
    )
    assert split.path.name == "s-00001-of-00004.gguf"
    result = exod.exoctl("models", "add", "split", str(split.path))
    assert result.code == 0, result
    dest = exod.home / "models" / "split"
    assert result.text == f"imported split from {split.path}: {dest}\n"
    assert result.stderr == ""  # progress goes to a terminal only
    ran = exod.exoctl("run", "split", PROMPT, "--max-tokens", "8")
    assert ran.code == 0, ran
    assert ran.stdout == expected(dest, PROMPT, 8, chat=True).stdout


def test_a_directory_added_by_the_user_is_kept_by_rm(exod: Daemon, tiny: TinyGGUF) -> None:
    exod.ok("models", "add", "tiny", str(tiny.path))
    outside = exod.home.parent / "outside"
    (exod.home / "models" / "tiny").rename(outside)
    exod.ok("models", "add", "mine", str(outside))
    assert exod.ok("models", "rm", "mine").text == "removed mine\n"
    assert (outside / "config.json").is_file()
    demo = exod.ok("models", "demo", "--json").json_lines()[0]
    assert exod.ok("models", "rm", "demo").text == f"removed demo and deleted {demo['path']}\n"
    assert not Path(demo["path"]).exists()


def _truncated(tiny: TinyGGUF, at: Path) -> Path:
    data = tiny.path.read_bytes()
    at.write_bytes(data[: len(data) // 2])
    return at


def _garbled(tiny: TinyGGUF, at: Path) -> Path:
    data = bytearray(tiny.path.read_bytes())
    data[24:2024] = bytes(range(256)) * 7 + bytes(208)
    at.write_bytes(bytes(data))
    return at


def _unknown_arch(tiny: TinyGGUF, at: Path) -> Path:
    # Same length, so every offset stays right.
    at.write_bytes(tiny.path.read_bytes().replace(b"llama", b"lla4a"))
    return at


def _no_tokenizer(tiny: TinyGGUF, at: Path) -> Path:
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    return write_tiny_gguf(at, weight_type=T.Q8_0, drop=keys).path


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (_truncated, 65, ("truncated",)),
        (_garbled, 65, ("garbled",)),
        (_unknown_arch, 65, ("'lla4a'",)),
        (_no_tokenizer, 65, ("tokenizer",)),
    ],
    ids=["truncated", "garbled-header", "unknown-arch", "no-tokenizer"],
)
def test_a_file_that_cannot_be_converted_leaves_nothing(
    exod: Daemon, tiny: TinyGGUF, tmp_path: Path, make: Any, code: int, words: tuple[str, ...]
) -> None:
    src = make(tiny, tmp_path / "bad.gguf")
    assert_refused(exod.exoctl("models", "add", "bad", str(src)), code, *words)
    assert_left_nothing(exod)


def test_a_missing_file_is_66_before_connecting(exod: Daemon, tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    result = exod.exoctl("models", "add", "x", str(missing), "--socket", str(tmp_path / "none"))
    assert_refused(result, 66, f"GGUF file {missing} does not exist")
    assert_left_nothing(exod)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_77(exod: Daemon, tiny: TinyGGUF, tmp_path: Path) -> None:
    locked = tmp_path / "locked.gguf"
    locked.write_bytes(tiny.path.read_bytes())
    locked.chmod(0)
    assert_refused(exod.exoctl("models", "add", "x", str(locked)), 77, "permission denied")
    assert_left_nothing(exod)


def test_an_existing_name_is_64_unless_forced(exod: Daemon, tiny: TinyGGUF, tmp_path: Path) -> None:
    first = exod.ok("models", "add", "m", str(tiny.path), "--json").json_lines()[-1]
    other = write_tiny_gguf(tmp_path / "other.gguf", weight_type=T.Q4_0, seed=7)
    refused = exod.exoctl("models", "add", "m", str(other.path))
    assert_refused(refused, 64, "the name 'm' is already registered", "--force`")
    (entry,) = registered(exod)
    assert entry["content_hash"] == first["content_hash"]
    assert models_dir(exod) == ["m"]

    replaced = exod.ok("models", "add", "m", str(other.path), "--force", "--json").json_lines()[-1]
    assert replaced["path"] == first["path"]
    assert replaced["content_hash"] != first["content_hash"]
    (entry,) = registered(exod)
    assert entry["content_hash"] == replaced["content_hash"]
    assert models_dir(exod) == ["m"]
    ran = exod.exoctl("run", "m", PROMPT, "--max-tokens", "8")
    assert ran.stdout == expected(Path(replaced["path"]), PROMPT, 8, chat=True).stdout


def test_ctrl_c_mid_conversion_cancels_it(
    daemon_factory: list[Daemon], tmp_path: Path, tiny: TinyGGUF
) -> None:
    d = Daemon.create(tmp_path / "home", EXOD_RUNNER_WRAPPER=f"{sys.executable} {SLOW}")
    daemon_factory.append(d)
    d.start()
    client = d.exoctl_bg("models", "add", "slow", str(tiny.path), "--json")
    lines = LineReader(client)
    first = json.loads(lines.next(timeout=30))
    assert first["type"] == "progress" and first["tensors_done"] < first["tensors_total"]
    assert [n for n in models_dir(d) if n.startswith(".import-slow-")], "mid-conversion"
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=5) == 130
    assert stderr_of(client) == CANCELLED_LINE
    rest = []
    while True:
        try:
            rest.append(json.loads(lines.next(timeout=1)))
        except AssertionError:
            break
    assert rest[-1] == {
        "type": "error",
        "reason": "cancelled",
        "message": CANCELLED_LINE.removeprefix("exoctl: ").strip(),
        "exit_code": 130,
    }
    assert wait_until(lambda: models_dir(d) == [], timeout=10.0), models_dir(d)
    assert_left_nothing(d)
    assert d.exoctl("status").code == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_exod_ending_mid_conversion_leaves_nothing(
    daemon_factory: list[Daemon], tmp_path: Path, tiny: TinyGGUF, sig: signal.Signals
) -> None:
    """exod stopped (SIGTERM) ends the import and cleans up; exod killed (SIGKILL) cannot, so
    the shim's lifeline ends the converter and the next start removes its files."""
    d = Daemon.create(tmp_path / "home", EXOD_RUNNER_WRAPPER=f"{sys.executable} {SLOW}")
    daemon_factory.append(d)
    d.start()
    client = d.exoctl_bg("models", "add", "slow", str(tiny.path), "--json")
    assert json.loads(LineReader(client).next(timeout=30))["type"] == "progress"
    code = d.stop(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert client.wait(timeout=10) == 69  # exod went away during the call
    assert wait_until(lambda: not converters(d), timeout=5.0), converters(d)
    if sig == signal.SIGTERM:
        assert models_dir(d) == []
    d.start()
    assert_left_nothing(d)


def test_a_stalled_import_is_ended(
    daemon_factory: list[Daemon], tmp_path: Path, tiny: TinyGGUF
) -> None:
    d = Daemon.create(
        tmp_path / "home", EXOD_RUNNER_WRAPPER=str(WRAPPER), EXOD_IMPORT_STALL_TIMEOUT="1"
    )
    daemon_factory.append(d)
    d.start()
    arm_wrapper(d, "hang")  # the converter never starts: no progress at all
    started = time.monotonic()
    result = d.exoctl("models", "add", "stuck", str(tiny.path))
    assert_refused(result, 75, "no progress", "EXOD_IMPORT_STALL_TIMEOUT=1")
    assert time.monotonic() - started < 15
    assert_left_nothing(d)
    children = wrapper_children(d)  # the wrapper's own `sleep`, in the converter's group
    assert children
    assert wait_until(lambda: not pids_alive(children), timeout=5.0), pids_alive(children)


def test_an_import_over_the_memory_cap_is_ended(
    daemon_factory: list[Daemon], tmp_path: Path, tiny: TinyGGUF
) -> None:
    d = Daemon.create(
        tmp_path / "home",
        EXOD_RUNNER_WRAPPER=f"{sys.executable} {SLOW}",
        EXOD_MAX_RUNNER_MEMORY="16M",
    )
    daemon_factory.append(d)
    d.start()
    result = d.exoctl("models", "add", "big", str(tiny.path))
    assert_refused(result, 75, "over the cap", "EXOD_MAX_RUNNER_MEMORY")
    assert_left_nothing(d)


# --- Ollama's store -----------------------------------------------------------------------------


def _blob(store: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def ollama_store(store: Path, model: str, tag: str, gguf: Path, stop: list[str]) -> Path:
    """The layout `ollama pull` writes: a manifest naming content-addressed blobs."""
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", **_blob(store, gguf.read_bytes())},
        {
            "mediaType": "application/vnd.ollama.image.template",
            **_blob(store, b"{{ .Prompt }}"),
        },
        {
            "mediaType": "application/vnd.ollama.image.params",
            **_blob(store, json.dumps({"stop": stop}).encode()),
        },
    ]
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            **_blob(store, b"{}"),
        },
        "layers": layers,
    }
    path = store / "manifests" / "registry.ollama.ai" / "library" / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return store


def test_an_ollama_model_imports_with_its_stop_words(
    exod: Daemon, tiny: TinyGGUF, tmp_path: Path
) -> None:
    # What the model says without a stop word, to pick one that cuts its answer short.
    exod.ok("models", "add", "plain", str(tiny.path))
    plain = exod.ok("run", "plain", PROMPT, "--max-tokens", "16").text.removesuffix("\n")
    stop = plain[len(plain) // 2 :][:2]
    assert stop.strip(), plain
    store = ollama_store(tmp_path / "ollama", "tiny", "q8", tiny.path, [stop])
    env = {"OLLAMA_MODELS": str(store)}

    result = exod.exoctl("models", "add", "ol", "ollama:tiny:q8", "--json", env=env)
    assert result.code == 0, result
    done = result.json_lines()[-1]
    assert done["stop"] == [stop]
    assert done["path"] == str(exod.home / "models" / "ol")
    plain_text = exod.exoctl("models", "add", "ol2", "ollama:tiny:q8", env=env).text
    assert plain_text == f"imported ol2 from ollama:tiny:q8: {exod.home / 'models' / 'ol2'}\n"
    # Its stop word is the default of every run on it that gives none.
    ran = exod.ok("run", "ol", PROMPT, "--max-tokens", "16")
    assert ran.text == plain[: plain.index(stop)] + "\n"

    missing = exod.exoctl("models", "add", "nope", "ollama:absent", env=env)
    assert_refused(missing, 66, "no model 'absent:latest'", "tiny:q8")
    assert sorted(m["name"] for m in registered(exod)) == ["ol", "ol2", "plain"]
    assert models_dir(exod) == ["ol", "ol2", "plain"]
