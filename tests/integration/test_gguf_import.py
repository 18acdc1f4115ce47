"""`python -m exod.models.gguf SRC DEST`, the conversion subprocess exod supervises, as a process:
JSON lines on stdout, one line on stderr for a failure, the exit code of the table, and nothing
left behind (no DEST, no staging directory) whatever happens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType as T

from exod.models.inspect import content_hash, inspect_model
from tests.gguf_files import TinyGGUF, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    lines: list[dict[str, Any]]
    stderr: str


def _run(*args: str | Path) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "exod.models.gguf", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return Run(proc.returncode, lines, proc.stderr)


def _assert_refused(run: Run, code: int, reason: str, dest: Path) -> str:
    """The failure as the user sees it; returns its message."""
    assert run.code == code, run
    final = run.lines[-1]
    assert final["error"] == reason, run
    assert run.stderr == f"error: {final['message']}\n"  # one line, no traceback
    assert not dest.exists()
    assert list(dest.parent.glob(f".{dest.name}.*")) == []
    message: str = final["message"]
    return message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    return write_tiny_gguf(tmp_path_factory.mktemp("import") / "tiny.gguf", weight_type=T.Q4_0)


def test_a_conversion(tiny: TinyGGUF, tmp_path: Path) -> None:
    dest = tmp_path / "models" / "tiny"
    run = _run(tiny.path, dest)
    assert run.code == 0, run
    assert run.stderr == ""
    *progress, final = run.lines
    assert final == {"done": str(dest), "content_hash": content_hash(dest)}
    assert progress, "at least the final progress line"
    assert progress[-1]["tensors_done"] == progress[-1]["tensors_total"] == 20
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"]
    assert set(progress[-1]) == {"tensors_done", "tensors_total", "bytes_done", "bytes_total"}
    assert inspect_model(dest).model_type == "llama"
    assert list(dest.parent.iterdir()) == [dest]


def test_a_split_set(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "s.gguf", weight_type=T.Q8_0, split_max_tensors=7)
    run = _run(tiny.path, tmp_path / "out")
    assert run.code == 0, run
    assert inspect_model(tmp_path / "out").model_type == "llama"


def test_a_missing_file_is_66(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    message = _assert_refused(_run(tmp_path / "nope.gguf", dest), 66, "model_not_found", dest)
    assert message == f"no file at {tmp_path / 'nope.gguf'}: give the path of a .gguf file"


def test_a_truncated_file_is_65(tiny: TinyGGUF, tmp_path: Path) -> None:
    src, dest = tmp_path / "cut.gguf", tmp_path / "out"
    data = tiny.path.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    message = _assert_refused(_run(src, dest), 65, "weights_corrupt", dest)
    assert "truncated: tensor" in message


def test_a_garbled_header_is_65(tiny: TinyGGUF, tmp_path: Path) -> None:
    src, dest = tmp_path / "garbled.gguf", tmp_path / "out"
    data = bytearray(tiny.path.read_bytes())
    data[24:2024] = os.urandom(2000)
    src.write_bytes(bytes(data))
    message = _assert_refused(_run(src, dest), 65, "weights_corrupt", dest)
    assert "header is garbled or cut short" in message


def test_an_unknown_architecture_is_65(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "m.gguf")
    data = tiny.path.read_bytes()
    # Same length, so that every offset stays right: "llama" -> "lla4a" everywhere in the keys.
    src, dest = tmp_path / "other.gguf", tmp_path / "out"
    src.write_bytes(data.replace(b"llama", b"lla4a"))
    message = _assert_refused(_run(src, dest), 65, "model_unsupported", dest)
    assert message.startswith("other.gguf is a 'lla4a' model, which cannot be converted")


def test_an_unsupported_type_is_65(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "m.gguf", embed_type=T.F16)
    data = tiny.path.read_bytes()
    name = b"token_embd.weight"
    at = data.find(name) + len(name) + 4 + 8 * 2  # then its dimension count, two dimensions
    assert data[at : at + 4] == int(T.F16).to_bytes(4, "little")
    # F16 -> I16: two bytes a value too, so the file stays whole, but not a weight type.
    src, dest = tmp_path / "odd.gguf", tmp_path / "out"
    src.write_bytes(data[:at] + int(T.I16).to_bytes(4, "little") + data[at + 4 :])
    message = _assert_refused(_run(src, dest), 65, "model_unsupported", dest)
    assert "tensor 'token_embd.weight' is of type I16, which cannot be converted" in message


def test_bad_arguments_are_64(tmp_path: Path) -> None:
    run = _run(tmp_path / "only-one-argument.gguf")
    assert run.code == 64
    assert run.lines == [{"error": "invalid_argument", "message": run.lines[0]["message"]}]
    assert "usage: python -m exod.models.gguf SRC.gguf DEST" in run.stderr
    assert len(run.stderr.splitlines()) == 1


def test_an_existing_destination_is_64_and_kept(tiny: TinyGGUF, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    run = _run(tiny.path, dest)
    assert run.code == 64
    assert run.lines[-1]["error"] == "invalid_argument"
    assert dest.is_dir() and list(dest.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_77(tiny: TinyGGUF, tmp_path: Path) -> None:
    src, dest = tmp_path / "locked.gguf", tmp_path / "out"
    src.write_bytes(tiny.path.read_bytes())
    src.chmod(0)
    _assert_refused(_run(src, dest), 77, "permission_denied", dest)


def test_sigterm_mid_conversion_leaves_nothing(tmp_path: Path) -> None:
    """Stopped after its first progress line, then SIGTERM: exit 130, no DEST, no staging."""
    tiny = write_tiny_gguf(
        tmp_path / "big.gguf",
        weight_type=T.Q4_K,
        hidden_size=512,
        intermediate_size=2048,
        num_layers=6,
        vocab_size=1024,
    )
    dest = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "exod.models.gguf", str(tiny.path), str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGSTOP)
    assert "tensors_done" in first
    assert list(tmp_path.glob(".out.importing-*")), "the staging directory exists mid-import"
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert json.loads(out.splitlines()[-1])["error"] == "cancelled"
    assert err == "error: the import was interrupted; nothing was kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gguf"]
