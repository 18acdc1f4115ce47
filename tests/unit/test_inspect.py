"""Model directories are checked before a runner is spent on them, promptly and without MLX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from exod.errors import ExoError
from exod.models.demo import Arch
from exod.models.inspect import content_hash, inspect_model, supported_architectures
from tests import models


def _reason(path: Path) -> ExoError:
    with pytest.raises(ExoError) as info:
        inspect_model(path)
    return info.value


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_demo_model_is_described(arch: Arch) -> None:
    path = models.demo_model(arch)
    files = inspect_model(path)
    assert files.path == path
    assert files.model_type == arch
    assert files.context_length == 2048
    assert files.weight_bytes == (path / "model.safetensors").stat().st_size
    assert files.has_chat_template


def test_model_without_chat_template_says_so() -> None:
    assert not inspect_model(models.demo_model(chat_template=False)).has_chat_template


def test_context_length_follows_the_config() -> None:
    assert inspect_model(models.demo_model(max_position_embeddings=512)).context_length == 512


def test_context_length_is_zero_when_unknown() -> None:
    path = models.copy_model()
    config = json.loads((path / "config.json").read_text())
    del config["max_position_embeddings"]
    (path / "config.json").write_text(json.dumps(config))
    assert inspect_model(path).context_length == 0


def test_missing_directory_is_not_found_and_never_looked_up_online(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    error = _reason(missing)
    assert error.reason == "model_not_found"
    assert str(missing) in error.message
    assert "hf:" in error.message


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    assert _reason(file).reason == "model_not_found"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (models.config_not_json, "model_unreadable"),
        (models.unknown_architecture, "model_unsupported"),
        (models.no_weights, "weights_corrupt"),
        (models.truncated_weights, "weights_corrupt"),
        (models.garbled_weights_header, "weights_corrupt"),
    ],
    ids=["config-not-json", "unknown-arch", "no-weights", "truncated", "garbled-header"],
)
def test_broken_models_are_refused_with_their_reason(make: Callable[[], Path], reason: str) -> None:
    error = _reason(make())
    assert error.reason == reason
    assert "\n" not in error.message


def test_truncated_by_one_byte_is_caught() -> None:
    path = models.copy_model()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert "truncated" in _reason(path).message


def test_missing_config_is_unreadable() -> None:
    path = models.copy_model()
    (path / "config.json").unlink()
    assert _reason(path).reason == "model_unreadable"


def test_config_that_is_not_an_object_is_unreadable() -> None:
    path = models.copy_model()
    (path / "config.json").write_text("[1, 2, 3]")
    assert _reason(path).reason == "model_unreadable"


def test_unknown_architecture_names_some_supported_ones() -> None:
    error = _reason(models.unknown_architecture("nosuchformer"))
    assert "nosuchformer" in error.message
    assert "llama" in error.message


def test_missing_model_type_is_unsupported() -> None:
    path = models.copy_model()
    config = json.loads((path / "config.json").read_text())
    del config["model_type"]
    (path / "config.json").write_text(json.dumps(config))
    assert _reason(path).reason == "model_unsupported"


def test_model_that_needs_its_own_code_is_unsupported() -> None:
    path = models.copy_model()
    config = json.loads((path / "config.json").read_text())
    config["model_file"] = "modeling_evil.py"
    (path / "config.json").write_text(json.dumps(config))
    assert _reason(path).reason == "model_unsupported"


def test_remapped_architecture_is_supported() -> None:
    # mlx-lm loads "mistral" with its llama module (utils.MODEL_REMAPPING).
    path = models.copy_model(models.demo_model("llama"))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mistral"
    (path / "config.json").write_text(json.dumps(config))
    assert inspect_model(path).model_type == "mistral"


def test_index_that_names_a_missing_shard_is_corrupt() -> None:
    path = models.copy_model()
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    error = _reason(path)
    assert error.reason == "weights_corrupt"
    assert "model-00002-of-00002.safetensors" in error.message


def test_weights_fifo_is_refused_promptly() -> None:
    path = models.weights_fifo()
    outcome: list[BaseException | None] = []

    def check() -> None:
        try:
            inspect_model(path)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():
        # Opening the FIFO for writing releases a reader blocked in open(), so the thread ends.
        os.close(os.open(path / "model.safetensors", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("inspect_model blocked on a named pipe")
    assert len(outcome) == 1
    assert isinstance(outcome[0], ExoError)
    assert outcome[0].reason == "weights_corrupt"
    assert "not a regular file" in outcome[0].message


def test_supported_architectures_are_mlx_lm_model_modules_and_aliases() -> None:
    supported = supported_architectures()
    assert {"llama", "qwen2", "qwen3", "mistral"} <= supported
    # Helper modules under mlx_lm/models are not architectures.
    assert not {"base", "cache", "rope_utils", "__init__"} & supported


def test_inspecting_does_not_import_mlx() -> None:
    path = models.demo_model()
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from exod.models.inspect import content_hash, inspect_model\n"
        f"inspect_model(Path({str(path)!r}))\n"
        f"content_hash(Path({str(path)!r}))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'mlx', 'mlx_lm'})\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_content_hash_is_the_same_for_copies_and_changes_with_the_files() -> None:
    original = models.demo_model()
    copy = models.copy_model(original)
    assert content_hash(copy) == content_hash(original)

    reseeded = models.demo_model(seed=1)  # other weights, same shapes and tokenizer
    assert content_hash(reseeded) != content_hash(original)

    edited = models.copy_model(original)
    config = json.loads((edited / "config.json").read_text())
    config["rope_theta"] = 5000.0
    (edited / "config.json").write_text(json.dumps(config))
    assert content_hash(edited) != content_hash(original)


def test_content_hash_reads_headers_not_whole_weight_files() -> None:
    path = models.copy_model()
    weights = path / "model.safetensors"
    # A header that declares 8 GiB of data, in a sparse file that size: reading it would take
    # many seconds, its header and size a moment.
    size = 8 << 30
    header = json.dumps({"big": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    raw = header.encode()
    with weights.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + size)
    start = time.monotonic()
    digest = content_hash(path)
    assert time.monotonic() - start < 1.0
    assert len(digest) == 64
    assert inspect_model(path).weight_bytes == 8 + len(raw) + size
