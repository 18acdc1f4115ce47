"""Find a model in Ollama's local store: its GGUF, its stop words and its prompt template.

Ollama keeps each pulled model as a manifest, `manifests/<host>/<namespace>/<model>/<tag>` (JSON in
the Docker image-manifest shape), whose layers name content-addressed files `blobs/sha256-<hex>`:
the GGUF (`application/vnd.ollama.image.model`), its `params` (JSON, with the "stop" list) and its
`template` (a Go template for Ollama's own server, not Jinja: the GGUF's chat template is the one
to use). Names are written as Ollama writes them: `NAME[:TAG]` (the tag defaults to "latest"),
`NAMESPACE/NAME[:TAG]` and `HOST/NAMESPACE/NAME[:TAG]` such as `hf.co/ORG/REPO:TAG`; the host
defaults to registry.ollama.ai and the namespace to "library". Nothing here writes to the store or
downloads anything.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from exod.errors import ExoError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
SYSTEM_STORE = Path("/usr/share/ollama/.ollama/models")  # where Linux packages keep it

MODEL_LAYER = "application/vnd.ollama.image.model"
PARAMS_LAYER = "application/vnd.ollama.image.params"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"

# Each part becomes a path component under the store: these rules keep "..", slashes and empty
# parts out, so that no name can reach outside it.
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}(:[0-9]{1,5})?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Name:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        """The short form `ollama list` shows: default host and namespace left out."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


@dataclass(frozen=True)
class OllamaModel:
    """What an import needs from Ollama's store for one model."""

    name: Name
    gguf: Path  # the model layer's blob: a GGUF file
    stop: tuple[str, ...]  # the "stop" list of the params layer (empty without one)
    template: str | None  # the template layer: Ollama's Go template, for reference only


def parse_name(text: str) -> Name:
    """Ollama's model name, with its defaults filled in. Raises ExoError (invalid_argument)."""
    rest, tag = text, DEFAULT_TAG
    colon, slash = text.rfind(":"), text.rfind("/")
    if colon > slash:
        rest, tag = text[:colon], text[colon + 1 :]
    parts = rest.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    host, namespace, model = parts if len(parts) == 3 else ("", "", "")
    if not (
        _HOST.fullmatch(host)
        and _PART.fullmatch(namespace)
        and _PART.fullmatch(model)
        and _TAG.fullmatch(tag)
    ):
        raise ExoError(
            "invalid_argument",
            f"{text!r} is not an Ollama model name: write NAME[:TAG], NAMESPACE/NAME[:TAG] or "
            "HOST/NAMESPACE/NAME[:TAG], as `ollama list` shows them",
        )
    return Name(host, namespace, model, tag)


def stores(env: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """The stores to look in, in order: OLLAMA_MODELS alone when set, else the user's store and
    then the system store of Linux packages (whose service runs as its own user)."""
    env = os.environ if env is None else env
    if env.get("OLLAMA_MODELS"):
        return [Path(env["OLLAMA_MODELS"])]
    home = Path.home() if home is None else home
    return [home / ".ollama" / "models", SYSTEM_STORE]


def resolve(text: str, where: Sequence[Path] | None = None) -> OllamaModel:
    """The model `text` names, from the first store that has it.

    Raises ExoError: invalid_argument (64) for a malformed name, model_not_found (66) when no
    store has it, permission_denied (77) when a store or the model's files cannot be read, and
    model_unsupported (65) for a model with no GGUF layer.
    """
    name = parse_name(text)
    where = stores() if where is None else list(where)
    existing = [s for s in where if os.path.lexists(s)]
    if not existing:
        raise ExoError(
            "model_not_found",
            f"no Ollama store at {' or '.join(map(str, where))}: set OLLAMA_MODELS to the "
            "directory Ollama keeps its models in",
        )
    unreadable: list[ExoError] = []
    known: list[Name] = []
    for store in existing:
        try:
            exact = _manifest(store, name)
            present = [] if exact else names(store)
        except ExoError as e:  # another store may still have it
            unreadable.append(e)
            continue
        found = name if exact else _match(name, present)
        if found is not None:
            return _read_model(store, store / "manifests" / Path(*found.parts), found)
        known.extend(present)
    if unreadable:
        raise unreadable[0]
    listed = ", ".join(str(n) for n in sorted(set(known), key=str)[:8])
    more = f" (and {len(set(known)) - 8} more)" if len(set(known)) > 8 else ""
    raise ExoError(
        "model_not_found",
        f"no model {str(name)!r} in Ollama's store ({', '.join(map(str, existing))}); "
        + (
            f"it has {listed}{more}: `ollama list` shows them"
            if listed
            else f"it holds no models: `ollama pull {name}` fetches it"
        ),
    )


def names(store: Path) -> list[Name]:
    """Every model the store's manifests name."""
    root = _store_dir(store) / "manifests"
    try:
        if not root.is_dir():
            return []
        return [Name(*parts) for parts in _files_at_depth(root, 4)]
    except OSError as e:  # scandir, unlike glob, reports a directory it cannot read
        raise _unreadable(Path(e.filename) if e.filename else root, e) from e


def _files_at_depth(folder: Path, depth: int) -> list[tuple[str, ...]]:
    """The relative parts of every file exactly depth levels below folder."""
    found: list[tuple[str, ...]] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if depth == 1 and entry.is_file():
                found.append((entry.name,))
            elif depth > 1 and entry.is_dir():
                found.extend(
                    (entry.name, *rest) for rest in _files_at_depth(Path(entry), depth - 1)
                )
    return found


def _manifest(store: Path, name: Name) -> bool:
    """Whether the store has name's manifest under exactly that spelling."""
    path = _store_dir(store) / "manifests" / Path(*name.parts)
    try:
        return path.is_file()
    except OSError as e:
        raise _unreadable(path, e) from e


def _match(name: Name, present: Sequence[Name]) -> Name | None:
    """name as the store spells it: Ollama matches names without regard to case."""
    if name in present:
        return name
    wanted = tuple(p.lower() for p in name.parts)
    return next((n for n in present if tuple(p.lower() for p in n.parts) == wanted), None)


def _read_model(store: Path, manifest: Path, name: Name) -> OllamaModel:
    layers = _layers(manifest)
    by_type: dict[str, str] = {}
    for media_type, digest in layers:
        by_type.setdefault(media_type, digest)
    if MODEL_LAYER not in by_type:
        kinds = ", ".join(sorted({t.rsplit(".", 1)[-1] for t, _ in layers})) or "none"
        raise ExoError(
            "model_unsupported",
            f"Ollama's {str(name)!r} has no GGUF layer (its layers: {kinds}); only models "
            "Ollama stores as GGUF can be imported",
        )
    gguf = _blob(store, by_type[MODEL_LAYER], name)
    stop: tuple[str, ...] = ()
    if PARAMS_LAYER in by_type:
        stop = _stop_words(_blob(store, by_type[PARAMS_LAYER], name), name)
    template = None
    if TEMPLATE_LAYER in by_type:
        template = _read_text(_blob(store, by_type[TEMPLATE_LAYER], name), name)
    return OllamaModel(name=name, gguf=gguf, stop=stop, template=template)


def _layers(manifest: Path) -> list[tuple[str, str]]:
    """(media type, digest) of each layer, checked."""
    try:
        data: object = json.loads(manifest.read_bytes())
    except OSError as e:
        raise _unreadable(manifest, e) from e
    except ValueError as e:
        raise _damaged(manifest, "is not JSON") from e
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise _damaged(manifest, "has no list of layers")
    checked: list[tuple[str, str]] = []
    for layer in layers:
        media = layer.get("mediaType") if isinstance(layer, dict) else None
        digest = layer.get("digest") if isinstance(layer, dict) else None
        if not isinstance(media, str) or not isinstance(digest, str):
            raise _damaged(manifest, "has a layer without a media type or digest")
        checked.append((media, digest))
    return checked


def _blob(store: Path, digest: str, name: Name) -> Path:
    match = _DIGEST.fullmatch(digest)
    if match is None:  # also what keeps a crafted digest from naming a file outside blobs/
        raise ExoError(
            "permission_denied",
            f"Ollama's manifest for {str(name)!r} names a blob by {digest!r}, not a sha256 digest; "
            f"`ollama pull {name}` repairs it",
        )
    path = _store_dir(store) / "blobs" / f"sha256-{match.group(1)}"
    try:
        if path.is_file():
            return path
    except OSError as e:
        raise _unreadable(path, e) from e
    raise ExoError(
        "permission_denied",
        f"Ollama's store is missing {path} that {str(name)!r} needs; `ollama pull {name}` "
        "repairs it",
    )


def _stop_words(path: Path, name: Name) -> tuple[str, ...]:
    try:
        params: object = json.loads(_read_text(path, name))
    except ValueError as e:
        raise _damaged(path, f"(the params of {str(name)!r}) is not JSON") from e
    stop = params.get("stop", []) if isinstance(params, dict) else None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _damaged(path, f"(the params of {str(name)!r}) has a stop that is not text")
    return tuple(str(s) for s in stop)


def _read_text(path: Path, name: Name) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise _unreadable(path, e) from e
    except UnicodeDecodeError as e:
        raise _damaged(path, f"(a text layer of {str(name)!r}) is not UTF-8") from e


def _store_dir(store: Path) -> Path:
    try:
        if not store.is_dir():
            raise ExoError(
                "permission_denied",
                f"Ollama's store {store} is not a directory: set OLLAMA_MODELS to the directory "
                "Ollama keeps its models in",
            )
    except OSError as e:
        raise _unreadable(store, e) from e
    return store


def _unreadable(path: Path, e: OSError) -> ExoError:
    return ExoError(
        "permission_denied",
        f"cannot read Ollama's store at {path}: {e.strerror or e}; run as the user Ollama stores "
        "models for, or set OLLAMA_MODELS to a store you can read",
    )


def _damaged(path: Path, what: str) -> ExoError:
    return ExoError(
        "permission_denied", f"Ollama's store is damaged: {path} {what}; `ollama pull` repairs it"
    )
