"""Loading the model as mlx_lm.load does, with progress per phase and per layer, and a reason
for every way it can fail.

Nothing here imports MLX at module level: a runner that is refused by the cheap checks never
pays for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exod.errors import ExoError
from exod.models.inspect import context_length, inspect_model
from exod.runners.channel import Channel

MAX_DETAIL_CHARS = 300


@dataclass(frozen=True)
class Loaded:
    model: Any  # mlx_lm is untyped: an nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    context_length: int
    load_s: float
    kv_bytes_per_token: int  # the KV cache one token of one request takes, all layers


# Exceptions of mlx_lm.utils.load_model by type, after the two cases that need a closer look.
_LOAD_ERRORS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (ImportError, "model_unsupported"),
    ((json.JSONDecodeError, UnicodeError), "model_unreadable"),
    ((KeyError, TypeError), "model_unreadable"),  # ModelArgs.from_dict: a required field missing
    (RuntimeError, "weights_corrupt"),  # mx.load: a garbled or truncated safetensors file
    (OSError, "model_unreadable"),
)


def load_error_reason(exc: BaseException) -> str:
    """The reason for an exception raised by mlx_lm.utils.load_model, by what it says."""
    if isinstance(exc, FileNotFoundError):
        # A missing config.json names its file; "No safetensors found" names none.
        missing = str(exc.filename or "")
        return "model_unreadable" if missing.endswith(".json") else "weights_corrupt"
    if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError | UnicodeError):
        text = str(exc)
        if "not supported" in text or "trust_remote_code" in text:
            return "model_unsupported"
        return "weights_corrupt"  # load_weights: missing or unexpected parameters, wrong shapes
    return next((reason for kinds, reason in _LOAD_ERRORS if isinstance(exc, kinds)), "internal")


def load_error_message(reason: str, path: Path, exc: BaseException) -> str:
    detail = one_line(exc)
    what_to_do = {
        "model_unsupported": "use a model of an architecture the installed mlx-lm supports",
        "weights_corrupt": "the weights are damaged or do not match config.json: fetch the "
        "model again",
        "model_unreadable": "the model files are damaged or incomplete: fetch the model again",
    }.get(reason, "see the runner log, and report it if it persists")
    return f"cannot load {path}: {detail}; {what_to_do}"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def load(model_path: str, channel: Channel) -> Loaded:
    """Load the model as mlx_lm.load(path) does, reporting progress per phase and per layer.

    Raises ExoError with the reason the load failed.
    """
    start = time.perf_counter()
    path = begin(model_path, channel)
    # What mlx_lm.load does, with lazy=True so that the layers can be evaluated one by one.
    model, config = load_lazily(path)
    evaluate(model, list(getattr(model, "layers", [])), path, channel)
    tokenizer = load_tokenizer(path, config, channel)
    try:
        kv_bytes = kv_bytes_per_token(model)
    except Exception as e:  # a model whose one-token forward pass fails cannot generate either
        raise ExoError("weights_corrupt", load_error_message("weights_corrupt", path, e)) from e
    return Loaded(model, tokenizer, context_length(config), time.perf_counter() - start, kv_bytes)


def begin(model_path: str, channel: Channel) -> Path:
    """The first phases of every load: the cheap checks, then MLX's import."""
    channel.progress("started")
    path = Path(model_path)
    # Cheap checks first (ExoError when they fail), and safe ones: mx.load would block forever
    # on a named pipe.
    inspect_model(path)
    # MLX loads only now: a runner that is refused above never pays for it.
    import mlx.core  # noqa: F401  # the import is the phase

    channel.progress("imported")
    return path


def load_lazily(path: Path, **options: Any) -> tuple[Any, dict[str, Any]]:
    """mlx_lm.utils.load_model(path, lazy=True, **options): the model with its weights unread."""
    from mlx_lm.utils import load_model

    try:
        model, config = load_model(path, lazy=True, trust_remote_code=False, **options)
    except Exception as e:
        reason = load_error_reason(e)
        raise ExoError(reason, load_error_message(reason, path, e)) from e
    return model, config


def evaluate(model: Any, layers: list[Any], path: Path, channel: Channel) -> None:
    """Read the weights: layer by layer (each a "weights" progress), then the rest (embeddings,
    final norm, head)."""
    import mlx.core as mx

    try:
        for i, layer in enumerate(layers, start=1):
            mx.eval(layer.parameters())
            channel.progress("weights", i, len(layers))
        mx.eval(model.parameters())
    except Exception as e:
        raise ExoError("weights_corrupt", load_error_message("weights_corrupt", path, e)) from e
    if not layers:
        channel.progress("weights", 1, 1)


def load_tokenizer(path: Path, config: dict[str, Any], channel: Channel) -> Any:
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    try:
        eos_token_ids = config.get("eos_token_id")
        tokenizer = mlx_load_tokenizer(path, None, eos_token_ids=eos_token_ids)  # type: ignore[no-untyped-call]  # mlx-lm leaves it unannotated
    except Exception as e:
        raise ExoError("model_unreadable", load_error_message("model_unreadable", path, e)) from e
    channel.progress("tokenizer")
    return tokenizer


def kv_bytes_per_token(model: Any) -> int:
    """What one more token of one request adds to the KV cache, measured on the model itself.

    Measured rather than computed from config.json: the cache's dtype is the activations' (not
    the config's torch_dtype), and architectures differ in what they keep per layer. One token
    goes through a fresh cache; each layer's keys and values are (batch, heads, positions, dim)
    with room for several positions, so their bytes per position is what a token costs. A
    layer whose state does not grow per token (a recurrent state) costs 0 per token.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    total = 0
    for layer in cache:
        for name in ("keys", "values"):
            array = getattr(layer, name, None)
            if isinstance(array, mx.array) and array.ndim == 4 and array.shape[2] > 0:
                mx.eval(array)
                total += array.nbytes // array.shape[2]
    return total
