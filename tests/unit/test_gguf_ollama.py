"""Finding a model in an Ollama store: names, defaults, layers, and each way a store can fail.

Every test builds its own store in the layout Ollama writes (manifests/<host>/<namespace>/<model>/
<tag> and content-addressed blobs/sha256-<hex>), holding tiny GGUF files written here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from exod.errors import REASONS, Exit, ExoError
from exod.models.gguf.ollama import (
    MODEL_LAYER,
    PARAMS_LAYER,
    SYSTEM_STORE,
    TEMPLATE_LAYER,
    Name,
    OllamaModel,
    parse_name,
    resolve,
    stores,
)
from exod.models.gguf.reader import open_gguf
from tests.gguf_vocab import byte_level_meta, write_gguf

GO_TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
STOP = ["<|im_start|>", "<|im_end|>"]


def blob(store: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return f"sha256:{digest}"


def add_model(
    store: Path,
    name: str,
    gguf: bytes,
    *,
    params: dict[str, object] | None = None,
    template: str | None = GO_TEMPLATE,
    media_type: str = MODEL_LAYER,
) -> Path:
    """A manifest for name (HOST/NAMESPACE/MODEL/TAG) with its layers, as `ollama pull` writes."""
    layers = [{"mediaType": media_type, "digest": blob(store, gguf), "size": len(gguf)}]
    if template is not None:
        data = template.encode()
        layers.append({"mediaType": TEMPLATE_LAYER, "digest": blob(store, data), "size": len(data)})
    license_text = b"Apache-2.0"
    layers.append(
        {
            "mediaType": "application/vnd.ollama.image.license",
            "digest": blob(store, license_text),
            "size": len(license_text),
        }
    )
    if params is not None:
        data = json.dumps(params).encode()
        layers.append({"mediaType": PARAMS_LAYER, "digest": blob(store, data), "size": len(data)})
    config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": blob(store, config),
            "size": len(config),
        },
        "layers": layers,
    }
    path = store / "manifests" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("ollama-gguf") / "tiny.gguf"
    return write_gguf(path, byte_level_meta("qwen2"), arch="qwen2").read_bytes()


@pytest.fixture
def store(tmp_path: Path, gguf_bytes: bytes) -> Path:
    """A store with a few models under the names Ollama gives them."""
    root = tmp_path / "models"
    add_model(root, "registry.ollama.ai/library/smollm2/latest", gguf_bytes, params={"stop": STOP})
    add_model(root, "registry.ollama.ai/library/smollm2/135m-q4_1", gguf_bytes + b"\0" * 32)
    add_model(root, "registry.ollama.ai/someone/tiny/v1", gguf_bytes, params={"temperature": 0.2})
    add_model(root, "hf.co/Org/Repo-GGUF/Q4_K_M", gguf_bytes, params={"stop": "</s>"})
    return root


def exit_of(e: ExoError) -> Exit:
    return REASONS[e.reason].exit


def failure(text: str, where: list[Path]) -> ExoError:
    with pytest.raises(ExoError) as caught:
        resolve(text, where)
    return caught.value


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest")),
        ("smollm2:135m-q4_1", ("registry.ollama.ai", "library", "smollm2", "135m-q4_1")),
        ("library/smollm2", ("registry.ollama.ai", "library", "smollm2", "latest")),
        ("someone/tiny:v1", ("registry.ollama.ai", "someone", "tiny", "v1")),
        ("hf.co/Org/Repo-GGUF:Q4_K_M", ("hf.co", "Org", "Repo-GGUF", "Q4_K_M")),
        ("localhost:5000/ns/m:t", ("localhost:5000", "ns", "m", "t")),
    ],
)
def test_names_get_ollamas_defaults(text: str, parts: tuple[str, str, str, str]) -> None:
    assert parse_name(text).parts == parts


@pytest.mark.parametrize(
    "text", ["", ":", "x:", "../x", "a/../../b", "a/b/c/d", "hf.co//x", "a b", "x:y:z", "/abs"]
)
def test_malformed_names_are_usage_errors(text: str) -> None:
    with pytest.raises(ExoError) as caught:
        parse_name(text)
    assert exit_of(caught.value) == Exit.USAGE
    assert repr(text) in caught.value.message


def test_short_names_print_as_ollama_list_does() -> None:
    assert str(parse_name("smollm2")) == "smollm2:latest"
    assert str(parse_name("someone/tiny:v1")) == "someone/tiny:v1"
    assert str(parse_name("hf.co/Org/Repo:Q4")) == "hf.co/Org/Repo:Q4"


def test_stores_in_order(tmp_path: Path) -> None:
    assert stores({"OLLAMA_MODELS": "/srv/ollama"}, tmp_path) == [Path("/srv/ollama")]
    assert stores({}, tmp_path) == [tmp_path / ".ollama" / "models", SYSTEM_STORE]


# --- resolving -------------------------------------------------------------------------------


def test_plain_name_resolves_to_latest(store: Path) -> None:
    model = resolve("smollm2", [store])
    assert model == OllamaModel(
        name=Name("registry.ollama.ai", "library", "smollm2", "latest"),
        gguf=model.gguf,
        stop=tuple(STOP),
        template=GO_TEMPLATE,
    )
    assert model.gguf.parent == store / "blobs"
    assert model.gguf.name == f"sha256-{hashlib.sha256(model.gguf.read_bytes()).hexdigest()}"
    assert open_gguf(model.gguf).arch == "qwen2"  # the blob is the GGUF itself


def test_tagged_and_namespaced_names(store: Path, gguf_bytes: bytes) -> None:
    tagged = resolve("smollm2:135m-q4_1", [store])
    assert tagged.gguf.stat().st_size == len(gguf_bytes) + 32  # the other blob
    assert resolve("library/smollm2:latest", [store]).gguf == resolve("smollm2", [store]).gguf
    assert resolve("someone/tiny:v1", [store]).stop == ()  # params without a stop list
    hf = resolve("hf.co/Org/Repo-GGUF:Q4_K_M", [store])
    assert (hf.name.host, hf.stop) == ("hf.co", ("</s>",))
    assert resolve("smollm2:135m-q4_1", [store]).stop == ()  # no params layer at all


def test_names_match_without_regard_to_case(store: Path) -> None:
    assert resolve("hf.co/org/repo-gguf:q4_k_m", [store]).name.model == "Repo-GGUF"


def test_later_store_is_searched_when_the_first_lacks_the_name(
    tmp_path: Path, gguf_bytes: bytes
) -> None:
    user, system = tmp_path / "user", tmp_path / "system"
    add_model(user, "registry.ollama.ai/library/other/latest", gguf_bytes)
    add_model(system, "registry.ollama.ai/library/smollm2/latest", gguf_bytes)
    assert resolve("smollm2", [user, system]).gguf.parent == system / "blobs"
    (tmp_path / "file").write_text("not a store")
    assert resolve("smollm2", [tmp_path / "file", system]).gguf.parent == system / "blobs"


def test_resolve_reads_ollama_models(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert resolve("smollm2").gguf.parent == store / "blobs"


# --- failures ----------------------------------------------------------------------------------


def test_unknown_name_is_not_found_and_lists_what_is_there(store: Path) -> None:
    e = failure("llama3:8b", [store])
    assert exit_of(e) == Exit.NOT_FOUND
    assert "'llama3:8b'" in e.message
    for name in ("smollm2:latest", "smollm2:135m-q4_1", "someone/tiny:v1", "hf.co/Org/Repo-GGUF"):
        assert name in e.message


def test_unknown_tag_is_not_found(store: Path) -> None:
    assert exit_of(failure("smollm2:7b", [store])) == Exit.NOT_FOUND


def test_empty_store_says_so(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    e = failure("smollm2", [tmp_path / "models"])
    assert exit_of(e) == Exit.NOT_FOUND
    assert "holds no models" in e.message


def test_missing_store_is_not_found(tmp_path: Path) -> None:
    e = failure("smollm2", [tmp_path / "nowhere"])
    assert exit_of(e) == Exit.NOT_FOUND
    assert "no Ollama store at" in e.message
    assert "OLLAMA_MODELS" in e.message


def test_store_that_is_a_file_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "models").write_text("oops")
    e = failure("smollm2", [tmp_path / "models"])
    assert exit_of(e) == Exit.PERMISSION
    assert "is not a directory" in e.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a directory whatever its mode")
def test_store_without_permission_is_unreadable(store: Path) -> None:
    (store / "manifests").chmod(0)
    try:
        e = failure("smollm2", [store])
    finally:
        (store / "manifests").chmod(0o755)
    assert exit_of(e) == Exit.PERMISSION


def test_unreadable_manifest_folder_is_reported_not_skipped(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root the mode bits above are no obstacle: make the scan of one namespace fail instead.
    locked = store / "manifests" / "registry.ollama.ai" / "someone"
    real_scandir = os.scandir

    def scandir(path: Path) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    e = failure("llama3", [store])
    assert exit_of(e) == Exit.PERMISSION
    assert f"cannot read Ollama's store at {locked}: Permission denied" in e.message
    assert resolve("smollm2", [store]).stop == tuple(STOP)  # found without scanning


def test_missing_blob_is_unreadable_and_says_how_to_repair(store: Path) -> None:
    gguf = resolve("smollm2", [store]).gguf
    gguf.unlink()
    e = failure("smollm2", [store])
    assert exit_of(e) == Exit.PERMISSION
    assert str(gguf) in e.message
    assert "ollama pull smollm2:latest" in e.message


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "is not JSON"),
        ('{"layers": 3}', "has no list of layers"),
        ('{"layers": [{"mediaType": 1}]}', "without a media type or digest"),
    ],
)
def test_garbled_manifest_is_unreadable(store: Path, content: str, words: str) -> None:
    (store / "manifests/registry.ollama.ai/library/smollm2/latest").write_text(content)
    e = failure("smollm2", [store])
    assert exit_of(e) == Exit.PERMISSION
    assert words in e.message


def test_digest_cannot_name_a_file_outside_the_blobs(store: Path) -> None:
    manifest = store / "manifests/registry.ollama.ai/library/smollm2/latest"
    data = json.loads(manifest.read_text())
    data["layers"][0]["digest"] = "sha256:../../../etc/passwd"
    manifest.write_text(json.dumps(data))
    e = failure("smollm2", [store])
    assert exit_of(e) == Exit.PERMISSION
    assert "not a sha256 digest" in e.message


def test_garbled_params_are_unreadable(store: Path) -> None:
    before = resolve("smollm2", [store])
    manifest = json.loads(
        (store / "manifests/registry.ollama.ai/library/smollm2/latest").read_text()
    )
    digest = next(x["digest"] for x in manifest["layers"] if x["mediaType"] == PARAMS_LAYER)
    (store / "blobs" / digest.replace(":", "-")).write_text('{"stop": [1, 2]}')
    assert before.stop  # it read fine before
    e = failure("smollm2", [store])
    assert exit_of(e) == Exit.PERMISSION
    assert "stop that is not text" in e.message


def test_model_without_gguf_layer_cannot_be_imported(tmp_path: Path, gguf_bytes: bytes) -> None:
    add_model(
        tmp_path,
        "registry.ollama.ai/library/safetensors/latest",
        gguf_bytes,
        media_type="application/vnd.ollama.image.tensor",
    )
    e = failure("safetensors", [tmp_path])
    assert exit_of(e) == Exit.CANNOT_RUN
    assert "no GGUF layer" in e.message
    assert "tensor" in e.message
