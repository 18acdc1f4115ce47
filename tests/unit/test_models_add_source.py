"""What `exoctl models add NAME SOURCE` makes of SOURCE before connecting; its progress line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from exoctl.failures import Failure
from exoctl.models import GGUFSource, gguf_source, import_progress_json, import_progress_text
from exod.proto.exo.v1 import control_pb2


def test_a_directory_is_registered_in_place(tmp_path: Path) -> None:
    assert gguf_source(str(tmp_path)) is None


def test_a_file_is_imported_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert gguf_source("m.gguf") == GGUFSource(tmp_path / "m.gguf", (), str(tmp_path / "m.gguf"))


def test_a_missing_file_is_66(tmp_path: Path) -> None:
    with pytest.raises(Failure) as caught:
        gguf_source(str(tmp_path / "gone.gguf"))
    assert caught.value.code == 66
    assert caught.value.message.startswith(f"GGUF file {tmp_path / 'gone.gguf'} does not exist.")


def test_a_missing_path_without_gguf_suffix_names_both_kinds(tmp_path: Path) -> None:
    with pytest.raises(Failure) as caught:
        gguf_source(str(tmp_path / "gone"))
    assert caught.value.code == 66
    assert "model directory or GGUF file" in caught.value.message


def _ollama_store(store: Path, stop: list[str]) -> Path:
    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (store / "blobs").mkdir(parents=True, exist_ok=True)
        (store / "blobs" / f"sha256-{digest}").write_bytes(data)
        return f"sha256:{digest}"

    layers = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": blob(b"GGUF"), "size": 4},
        {
            "mediaType": "application/vnd.ollama.image.params",
            "digest": blob(json.dumps({"stop": stop}).encode()),
            "size": 1,
        },
    ]
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q8"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return store


def test_an_ollama_model_brings_its_stop_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(_ollama_store(tmp_path / "o", ["<|im_end|>"])))
    found = gguf_source("ollama:tiny:q8")
    assert found is not None
    assert found.stop == ("<|im_end|>",)
    assert found.source == "ollama:tiny:q8"
    assert found.path.read_bytes() == b"GGUF"


def test_an_ollama_name_not_in_the_store_is_66(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(_ollama_store(tmp_path / "o", [])))
    with pytest.raises(Failure) as caught:
        gguf_source("ollama:other")
    assert caught.value.code == 66
    assert "tiny:q8" in caught.value.message


def test_progress_text_and_json() -> None:
    p = control_pb2.ImportProgress(
        tensors_done=120, tensors_total=272, bytes_done=45_100_000, bytes_total=96_600_000
    )
    assert import_progress_text("smollm2", p) == (
        "importing smollm2: 120/272 tensors, 45.1/96.6 MB (46%)"
    )
    assert import_progress_json(p) == {
        "type": "progress",
        "tensors_done": 120,
        "tensors_total": 272,
        "bytes_done": 45_100_000,
        "bytes_total": 96_600_000,
    }
    assert import_progress_text("m", control_pb2.ImportProgress(tensors_total=3)) == (
        "importing m: 0/3 tensors"
    )
