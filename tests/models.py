"""Models for tests: demo models made once per test session, and broken copies of them.

Every model lives in one temporary directory for the session (removed at exit). A demo model is
written once per set of arguments; each broken model is a fresh copy, broken in one way.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from exod.models.demo import Arch, write_demo_model

_lock = threading.Lock()
_root: Path | None = None
_made: dict[tuple[Any, ...], Path] = {}
_copies = 0


def root() -> Path:
    """The session's model directory, made on first use."""
    global _root  # noqa: PLW0603  # one directory for the whole session, made lazily
    with _lock:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="exod-test-models-"))
            atexit.register(shutil.rmtree, _root, True)
        return _root


def demo_model(arch: Arch = "qwen2", **kwargs: Any) -> Path:
    """A demo model for these arguments (see write_demo_model), written once per session.

    Tests must not change it: break a copy (copy_model, or the helpers below) instead.
    """
    key = (arch, *sorted(kwargs.items()))
    base = root()
    with _lock:
        if key not in _made:
            name = "-".join([arch, *(f"{k}={v}" for k, v in sorted(kwargs.items()))])
            _made[key] = write_demo_model(base / name, arch=arch, **kwargs)
        return _made[key]


def copy_model(src: Path | None = None) -> Path:
    """A private copy of src (default: the qwen2 demo model) that a test may change."""
    global _copies  # noqa: PLW0603  # a counter for unique names within the session
    src = src or demo_model()
    base = root()
    with _lock:
        _copies += 1
        dest = base / f"copy-{_copies}-{src.name}"
    shutil.copytree(src, dest)
    return dest


def _edit_config(path: Path, **changes: Any) -> Path:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


def config_not_json() -> Path:
    """config.json that does not parse."""
    path = copy_model()
    (path / "config.json").write_text('{"model_type": "qwen2", ')
    return path


def unknown_architecture(model_type: str = "nosuchformer") -> Path:
    """A model whose config names an architecture mlx-lm does not have."""
    return _edit_config(copy_model(), model_type=model_type)


def truncated_weights(keep: float = 0.5) -> Path:
    """model.safetensors cut to a fraction of its size, as after an interrupted download."""
    path = copy_model()
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    return path


def garbled_weights_header() -> Path:
    """model.safetensors whose header is not JSON."""
    path = copy_model()
    weights = path / "model.safetensors"
    header = b"{this is not a header}"
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    return path


def weights_fifo() -> Path:
    """model.safetensors that is a named pipe: opening it would block forever."""
    path = copy_model()
    weights = path / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    return path


def no_weights() -> Path:
    """A model directory without any safetensors."""
    path = copy_model()
    (path / "model.safetensors").unlink()
    return path


def mismatched_shapes() -> Path:
    """A config that does not match the weights (a shape mismatch when loading)."""
    return _edit_config(copy_model(), intermediate_size=96)
