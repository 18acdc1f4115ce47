"""Turn what a user typed as MODEL into a model directory, never by going online.

A registered name maps to its directory; an absolute path is taken as it is (exoctl makes
relative paths absolute before sending them); `hf:ORG/NAME` is looked up in the local Hugging
Face cache only, since runners and the daemon work offline by design.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from exod.errors import ExoError
from exod.eventlog import ModelView

HF_PREFIX = "hf:"


def resolve_model(model: str, registry: Mapping[str, ModelView]) -> Path:
    if not model:
        raise ExoError("invalid_argument", "no model given: name a registered model or a directory")
    if model in registry:
        path = Path(registry[model].path)
        if not path.is_dir():
            raise ExoError(
                "model_not_found",
                f"registered model {model!r} points to {path}, which no longer exists: "
                f"point it elsewhere with `exoctl models add {model} DIR --force`, or remove it "
                f"with `exoctl models rm {model}`",
            )
        return path
    if model.startswith(HF_PREFIX):
        return _hf_cached(model[len(HF_PREFIX) :])
    path = Path(model)
    if path.is_absolute():
        return path
    raise ExoError(
        "model_not_found",
        f"no registered model named {model!r}: see `exoctl models list`, register one with "
        "`exoctl models add NAME DIR`, or pass a model directory",
    )


def _hf_cached(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # lazy: only hf: ids need it
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        raise ExoError(
            "model_not_found",
            f"hf:{repo_id} is not in the local Hugging Face cache, and exod never downloads "
            "(runners run with HF_HUB_OFFLINE=1): fetch it on a connected machine with "
            f"`hf download {repo_id}`, or pass its directory",
        ) from e
