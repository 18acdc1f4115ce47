"""Validate a model directory before a runner is spent on it, without MLX and without blocking.

Everything here reads small things only: config.json, the safetensors headers (a few KiB each),
file sizes. A weights file that is not a regular file (a named pipe would block an open forever,
a device could be endless) is refused from its stat, before anything opens it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from exod.errors import ExoError

# Largest config or tokenizer_config we read; real ones are a few KiB, this bounds a bad one.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# safetensors caps its JSON header at 100 MB; anything longer is garbage, not a header.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Bytes per element for the dtypes a safetensors header may name.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}

# Files that a tokenizer may consist of, hashed by content_hash.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Config keys that name the longest sequence a model was trained for, most specific first.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "max_sequence_length",
    "seq_length",
    "n_positions",
    "n_ctx",
    "model_max_length",
)

# Bytes of weight data that content_hash reads at each end of a safetensors file.
SAMPLE_BYTES = 64 * 1024

_SAFETENSORS_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class ModelFiles:
    path: Path
    model_type: str
    context_length: int  # 0 when the config does not say
    weight_bytes: int
    has_chat_template: bool


def inspect_model(path: Path) -> ModelFiles:
    """Check that path holds a model mlx-lm can load; raise ExoError with a reason if not."""
    _require_dir(path)
    config = read_config(path)
    model_type = _supported_model_type(path, config)
    weight_bytes = sum(_check_safetensors(f) for f in weight_files(path))
    return ModelFiles(
        path=path,
        model_type=model_type,
        context_length=context_length(config),
        weight_bytes=weight_bytes,
        has_chat_template=has_chat_template(path),
    )


def _require_dir(path: Path) -> None:
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        is_dir = False
    if not is_dir:
        raise ExoError(
            "model_not_found",
            f"no model directory at {path}: give the path of a directory holding config.json "
            "and *.safetensors (exod never looks a model up online; use hf:ORG/NAME for a "
            "model already in the Hugging Face cache)",
        )


def _read_small_file(path: Path, limit: int) -> bytes:
    """The content of a regular file no larger than limit; OSError/ValueError otherwise."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    if st.st_size > limit:
        raise ValueError(f"larger than {limit} bytes")
    with path.open("rb") as f:
        return f.read(limit + 1)


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; ExoError model_unreadable when it is missing or not a JSON object."""
    file = path / "config.json"
    try:
        config = json.loads(_read_small_file(file, MAX_CONFIG_BYTES))
    except FileNotFoundError:
        raise ExoError(
            "model_unreadable",
            f"{path} has no config.json: it is not a model directory, or the download is "
            "incomplete; fetch the model again",
        ) from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ExoError(
            "model_unreadable",
            f"cannot read {file} ({_one_line(e)}): replace it with the model's original "
            "config.json",
        ) from None
    if not isinstance(config, dict):
        raise ExoError(
            "model_unreadable",
            f"{file} is not a JSON object: replace it with the model's original config.json",
        )
    return config


def _supported_model_type(path: Path, config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    supported = supported_architectures()
    examples = ", ".join(
        e for e in ("llama", "qwen2", "qwen3", "mistral", "gemma3") if e in supported
    )
    if not isinstance(model_type, str) or not model_type:
        raise ExoError(
            "model_unsupported",
            f"{path / 'config.json'} names no model_type, so mlx-lm cannot pick an "
            f"architecture: use a model in MLX or Hugging Face format (e.g. {examples})",
        )
    if model_type not in supported:
        raise ExoError(
            "model_unsupported",
            f"architecture {model_type!r} is not supported by the installed mlx-lm: use a model "
            f"of a supported architecture (e.g. {examples}) or upgrade mlx-lm",
        )
    if config.get("model_file") is not None:
        # mlx-lm would have to run Python code shipped with the model; exod never allows that.
        raise ExoError(
            "model_unsupported",
            f"{path} needs its own Python code ({config['model_file']!r}) to build the model, "
            "which exod does not run: use a model of a built-in mlx-lm architecture",
        )
    return model_type


def context_length(config: dict[str, Any]) -> int:
    """The longest sequence the config admits, or 0 when it does not say."""
    for source in (config, config.get("text_config")):
        if not isinstance(source, dict):
            continue
        for key in CONTEXT_KEYS:
            value = source.get(key)
            # bool is an int too, and never a length.
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return 0


# Bytes of one element of the KV cache by the config's dtype. mlx-lm keeps the cache in the dtype
# the model computes in; a config that names none is counted at float32, the most it can be.
KV_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
UNKNOWN_KV_DTYPE_BYTES = 4


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """The KV cache one token of one sequence takes over all layers (K and V), from config.json.

    0 when the config lacks the sizes. An estimate for admission until the runner reports the
    loaded model's own figure (Ready.kv_bytes_per_token): sliding windows or latent attention
    make the real one smaller, never larger.
    """
    for source in (config, config.get("text_config")):
        if not isinstance(source, dict):
            continue
        layers = _positive(source.get("num_hidden_layers"))
        heads = _positive(source.get("num_attention_heads"))
        hidden = _positive(source.get("hidden_size"))
        if not (layers and heads and (hidden or source.get("head_dim"))):
            continue
        kv_heads = _positive(source.get("num_key_value_heads")) or heads
        head_dim = _positive(source.get("head_dim")) or hidden // heads
        dtype = source.get("torch_dtype") or source.get("dtype") or config.get("torch_dtype")
        known = KV_DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
        size = known or UNKNOWN_KV_DTYPE_BYTES
        return 2 * layers * kv_heads * head_dim * size
    return 0


def _positive(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer files carry a chat template (inline or as a separate file)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if _is_regular(path / name):
            return True
    try:
        tok_config = json.loads(_read_small_file(path / "tokenizer_config.json", MAX_CONFIG_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(tok_config, dict) and bool(tok_config.get("chat_template"))


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def weight_files(path: Path) -> list[Path]:
    """The safetensors files mlx-lm loads (model*.safetensors), plus any the index names.

    A shard that the index names and that is missing is reported here: mlx-lm would load the
    rest and fail later with a less helpful message.
    """
    files = set(path.glob("model*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(_read_small_file(index, MAX_CONFIG_BYTES))["weight_map"]
            named = {path / str(name) for name in weight_map.values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise corrupt(index, f"unreadable index ({_one_line(e)})") from None
        missing = sorted(n.name for n in named if not os.path.lexists(n))
        if missing:
            raise corrupt(index, f"names shards that are missing: {', '.join(missing[:3])}")
        files |= named
    if not files:
        raise ExoError(
            "weights_corrupt",
            f"{path} holds no model*.safetensors weights: the download is incomplete, or the "
            "model is in another format (convert it with mlx_lm.convert)",
        )
    return sorted(files)


def corrupt(file: Path, what: str) -> ExoError:
    return ExoError(
        "weights_corrupt",
        f"{file}: {what}; the weights are damaged or incomplete: fetch the model again",
    )


def safetensors_header(file: Path) -> tuple[dict[str, Any], int, int]:
    """(header, header length, file size) of a safetensors file; ExoError when it is bad.

    The file is stat-ed before it is opened: only a regular file is opened at all.
    """
    try:
        st = os.stat(file)
    except OSError as e:
        raise corrupt(file, f"cannot stat ({_one_line(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise corrupt(file, "not a regular file")
    size = st.st_size
    try:
        with file.open("rb") as f:
            prefix = f.read(_SAFETENSORS_LEN.size)
            if len(prefix) < _SAFETENSORS_LEN.size:
                raise corrupt(file, "shorter than a safetensors header")
            (header_len,) = _SAFETENSORS_LEN.unpack(prefix)
            if header_len > MAX_HEADER_BYTES or _SAFETENSORS_LEN.size + header_len > size:
                raise corrupt(file, "garbled safetensors header length")
            raw = f.read(header_len)
    except OSError as e:
        raise corrupt(file, f"cannot read ({_one_line(e)})") from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise corrupt(file, "garbled safetensors header") from None
    if not isinstance(header, dict):
        raise corrupt(file, "garbled safetensors header")
    return header, header_len, size


def _check_safetensors(file: Path) -> int:
    """The file's size, after checking that its header is whole and its tensors fit in it."""
    header, header_len, size = safetensors_header(file)
    data_size = size - _SAFETENSORS_LEN.size - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry = tensor_entry(info)
        if entry is None:
            raise corrupt(file, f"garbled entry for tensor {name!r}")
        begin, end, expected = entry
        if end > data_size:
            raise corrupt(file, f"truncated: tensor {name!r} ends past the end of the file")
        if end - begin != expected:
            raise corrupt(file, f"tensor {name!r} has {end - begin} bytes, expected {expected}")
    return size


def tensor_entry(info: object) -> tuple[int, int, int] | None:
    """(begin, end, bytes its dtype and shape call for) of a header entry; None if garbled."""
    if not isinstance(info, dict):
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype, str) and _is_counts(shape) and _is_counts(offsets)):
        return None
    if dtype not in DTYPE_BYTES or len(offsets) != 2 or offsets[0] > offsets[1]:
        return None
    return offsets[0], offsets[1], math.prod(shape) * DTYPE_BYTES[dtype]


def _is_counts(value: object) -> TypeGuard[list[int]]:
    # bool is an int too, and never a count.
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def content_hash(path: Path) -> str:
    """A sha256 that changes when the model's files change, reading only small parts of them.

    It covers config.json, the tokenizer files, and each weights file's header, size, and the
    first and last SAMPLE_BYTES of its data: weights with the same shapes but other values
    (another fine-tune, another seed) hash differently, and a 100 GB model hashes in moments.
    """
    digest = hashlib.sha256()

    def add(name: str, data: bytes) -> None:
        # Length-prefixed so that no two different file sets hash alike by concatenation.
        for part in (name.encode(), data):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)

    for name in ("config.json", *TOKENIZER_FILES):
        file = path / name
        if _is_regular(file):
            try:
                add(name, file.read_bytes())
            except OSError as e:
                raise ExoError("model_unreadable", f"cannot read {file}: {_one_line(e)}") from None
    for file in weight_files(path):
        header, header_len, size = safetensors_header(file)
        add(file.name, json.dumps(header, sort_keys=True).encode() + size.to_bytes(8, "big"))
        add(file.name, _data_samples(file, _SAFETENSORS_LEN.size + header_len, size))
    return digest.hexdigest()


def _data_samples(file: Path, data_start: int, size: int) -> bytes:
    """The first and last SAMPLE_BYTES of a safetensors file's data (a regular file, checked)."""
    try:
        with file.open("rb") as f:
            f.seek(data_start)
            head = f.read(SAMPLE_BYTES)
            f.seek(max(data_start, size - SAMPLE_BYTES))
            return head + f.read(SAMPLE_BYTES)
    except OSError as e:
        raise corrupt(file, f"cannot read ({_one_line(e)})") from None


@functools.cache
def supported_architectures() -> frozenset[str]:
    """model_type values the installed mlx-lm can load, found without importing it.

    Importing mlx_lm imports MLX (seconds, and memory the daemon has no use for), so its files
    are read instead: one module per architecture under models/, plus the aliases that
    utils.MODEL_REMAPPING maps onto them.
    """
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    package = Path(next(iter(spec.submodule_search_locations)))
    # An architecture module defines ModelArgs; helpers (cache, rope_utils, ...) do not.
    names = {
        f.stem
        for f in (package / "models").glob("*.py")
        if "class ModelArgs" in f.read_text(encoding="utf-8", errors="replace")
    }
    aliases = _model_remapping(package / "utils.py")
    names |= {alias for alias, target in aliases.items() if target in names}
    return frozenset(names)


def _model_remapping(utils: Path) -> dict[str, str]:
    """MODEL_REMAPPING from mlx_lm/utils.py, read from its source as a literal."""
    try:
        tree = ast.parse(utils.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MODEL_REMAPPING" for t in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return {}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
