"""Loading one rank of a model split over MLX's ring (Load.rank set).

What mlx-lm's sharded_load does, with the split exod chose (sharded_load splits evenly, and needs
an index file): the model is built lazily, its layers placed with the model's own `pipeline`,
and only this rank's layers read, plus the embeddings, final norm and head that every rank
keeps. The directory may hold only those (exod.runners.partial): every tensor this rank needs
is checked to be there, with the shape the model expects, before anything is read.

All of that, and the tokenizer, comes before the ring: a rank that cannot load fails at once,
rather than after every peer has joined. Then the "ring" phase (waiting for every rank), and a
first forward pass over the ring (measuring the KV cache) that every rank makes together.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from exod.errors import ExoError
from exod.models.inspect import context_length
from exod.proto.exo.v1 import runner_pb2
from exod.runners.channel import Channel
from exod.runners.load import (
    Loaded,
    begin,
    evaluate,
    kv_bytes_per_token,
    load_error_message,
    load_lazily,
    load_tokenizer,
)
from exod.runners.ring import Ring, Shape, check_rank, is_ring_failure, join, rank_failed


def load_rank(load: runner_pb2.Load, channel: Channel) -> tuple[Loaded, Ring]:
    """Load this rank's part of the model and join the ring; ExoError with the reason if not."""
    start = time.perf_counter()
    rank = load.rank
    path = begin(load.model_path, channel)
    shapes = Shapes()
    model, config = load_lazily(path, strict=False, get_model_classes=shapes.classes)
    inner: Any = getattr(model, "model", None)
    model_type = str(config.get("model_type", "?"))
    if not callable(getattr(inner, "pipeline", None)):
        raise ExoError(
            "model_unsupported",
            f"mlx-lm has no pipeline for {model_type}, so it cannot be split over several "
            "machines: run it whole on one",
        )
    if "split" not in inspect.signature(inner.pipeline).parameters:
        raise ExoError(
            "model_unsupported",
            f"mlx-lm's pipeline for {model_type} splits only evenly, not as exod plans: run it "
            "whole on one machine",
        )
    check_rank(rank, len(inner.layers))
    try:
        inner.pipeline(Shape(rank.rank, rank.size), split=list(rank.split))
    except ValueError as e:  # the architecture's own rules for a split
        raise ExoError(
            "model_unsupported",
            f"mlx-lm cannot split {model_type} as {list(rank.split)}: {e}; run it whole on one "
            "machine",
        ) from e
    shapes.check(model, path)
    evaluate(model, list(inner.pipeline_layers), path, channel)
    tokenizer = load_tokenizer(path, config, channel)

    channel.progress("ring")
    ring = join(rank, channel)
    try:
        kv_bytes = kv_bytes_per_token(model)  # a forward pass through every rank
    except Exception as e:
        if is_ring_failure(e):
            raise rank_failed(rank, e) from e
        raise ExoError("weights_corrupt", load_error_message("weights_corrupt", path, e)) from e
    loaded = Loaded(model, tokenizer, context_length(config), time.perf_counter() - start, kv_bytes)
    return loaded, ring


class Shapes:
    """The tensors the files hold and the parameters the model expects, as load_model loads.

    With strict=False (a partial directory lacks other ranks' layers) load_model neither
    requires every parameter nor compares shapes; a missing tensor would silently keep its random
    initial value. So the model class is wrapped to note, when load_model hands it the weights
    (after sanitize and quantization, under the model's own names), what it got and what it
    expected; check() then compares the two for the parameters this rank keeps.
    """

    def __init__(self) -> None:
        self.given: dict[str, tuple[int, ...]] = {}
        self.expected: dict[str, tuple[int, ...]] = {}

    def classes(self, config: dict[str, Any]) -> tuple[type[Any], type[Any]]:
        from mlx_lm.utils import _get_classes  # private, but the lookup load_model itself uses

        model_class, args_class = _get_classes(config)
        shapes = self

        class Noting(model_class):  # type: ignore[valid-type,misc]  # a class known at runtime only
            def load_weights(self, weights: list[tuple[str, Any]], strict: bool = True) -> Any:
                shapes.expected.update(
                    (k, tuple(v.shape)) for k, v in flat(self.parameters()).items()
                )
                shapes.given.update((k, tuple(v.shape)) for k, v in weights)
                return super().load_weights(weights, strict=strict)

        return Noting, args_class

    def check(self, model: Any, path: Path) -> None:
        """ExoError weights_corrupt naming the first parameter this rank keeps that the files
        lack, or hold with another shape."""
        for name in flat(model.parameters()):
            if name not in self.given:
                raise ExoError(
                    "weights_corrupt",
                    f"{path} lacks the tensor {name}, which this rank needs: the weights are "
                    "incomplete; fetch the model again",
                )
            if self.given[name] != self.expected.get(name, self.given[name]):
                raise ExoError(
                    "weights_corrupt",
                    f"{path}: the tensor {name} has shape {list(self.given[name])}, the model "
                    f"expects {list(self.expected[name])}; fetch the model again",
                )


def flat(tree: Any) -> dict[str, Any]:
    """A module's parameters by their dotted names, in the module's order."""
    from mlx.utils import tree_flatten

    names = tree_flatten(tree, destination={})
    assert isinstance(names, dict)  # what tree_flatten returns into a dict destination
    return names
