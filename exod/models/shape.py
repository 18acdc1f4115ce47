"""The model's side of placement: its decoder layers and what each weighs, from its files alone.

Read from config.json and the safetensors headers (a few KiB each, through exod.models.inspect),
never from the weights and never with MLX. A tensor named `….layers.N.…` belongs to layer N;
every other tensor (embeddings, final norm, lm_head) is shared: mlx-lm's pipeline embeds,
normalises and projects on every rank, so every rank keeps those. Whether mlx-lm can split the
architecture at all is asked of mlx-lm itself, in a subprocess (exod.models.pipeline_check).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exod.errors import ExoError
from exod.models.inspect import (
    corrupt,  # the same words for a damaged file as every other check of the weights
    read_config,
    safetensors_header,
    tensor_entry,
    weight_files,
)

# `model.layers.12.mlp.up_proj.weight`, `language_model.model.layers.3.…`: the layer a tensor
# belongs to (mlx-lm's sharded_load matches by the same pattern, before sanitize renames).
LAYER_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(tensor: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for a shared one (embeddings, norm, head)."""
    match = LAYER_TENSOR.search(tensor)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Shape:
    model_type: str
    layer_bytes: tuple[int, ...]  # the weight bytes of decoder layer i, for every layer
    shared_bytes: int  # what every rank keeps: embeddings, final norm, lm_head
    # Whether mlx-lm can split its layers over ranks (pipeline_check); False until asked.
    pipeline: bool = False

    @property
    def layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.shared_bytes

    def bytes_of(self, first: int, last: int) -> int:
        """The weight bytes of layers first..last (inclusive)."""
        return sum(self.layer_bytes[first : last + 1])


def read_shape(path: Path) -> Shape:
    """The shape of the model in `path` (a directory inspect_model accepted); ExoError when
    its config or headers are unreadable."""
    config = read_config(path)
    tensors: dict[str, int] = {}
    for file in weight_files(path):  # the shards of an index too
        header, _, _ = safetensors_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entry = tensor_entry(info)
            if entry is None:
                raise corrupt(file, f"garbled entry for tensor {name!r}")
            begin, end, _ = entry
            # A name in two files (a stale single file beside shards): mlx-lm keeps one.
            tensors.setdefault(name, end - begin)
    return shape_of(str(config.get("model_type") or ""), num_layers(config), tensors)


def shape_of(model_type: str, layers: int | None, tensors: dict[str, int]) -> Shape:
    """The shape from tensor names and byte counts; `layers` as the config says (None: as many
    as the tensors name). Tensors of layers beyond the config's count are not loaded by mlx-lm
    (its sanitize drops them: DeepSeek's multi-token-prediction layers), so they count nowhere."""
    by_layer: dict[int, int] = {}
    shared = 0
    for name, size in tensors.items():
        layer = layer_of(name)
        if layer is None:
            shared += size
        else:
            by_layer[layer] = by_layer.get(layer, 0) + size
    count = layers if layers is not None else max(by_layer, default=-1) + 1
    if count <= 0 and by_layer:
        raise ExoError(
            "model_unreadable",
            "config.json says the model has no layers while its weights hold some: replace it "
            "with the model's original config.json",
        )
    return Shape(
        model_type=model_type,
        layer_bytes=tuple(by_layer.get(i, 0) for i in range(max(count, 0))),
        shared_bytes=shared,
    )


def num_layers(config: dict[str, Any]) -> int | None:
    """num_hidden_layers from the config (or its text_config, as multimodal ones nest it)."""
    for source in (config, config.get("text_config")):
        if isinstance(source, dict):
            value = source.get("num_hidden_layers")
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return None
