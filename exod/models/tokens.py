"""Count a prompt's tokens in the daemon, so that a prompt too long is refused before any runner.

The `tokenizers` library reads tokenizer.json directly: no transformers, no MLX, a cheap import.
The runner counts again with the model's own tokenizer; this count is the early answer.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from pathlib import Path

from tokenizers import Tokenizer

# Tokenizers kept in memory, one per model file version; a few MB each for real models.
_CACHE_SIZE = 8


def count_prompt_tokens(model_path: Path, prompt: str) -> int | None:
    """Tokens in prompt as mlx-lm encodes a raw prompt.

    None when the model has no tokenizer.json (or one that does not parse): the caller then
    leaves the check to the runner.
    """
    file = model_path / "tokenizer.json"
    try:
        st = os.stat(file)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        tokenizer, bos_token = _load(str(file), st.st_mtime_ns, st.st_size)
    except Exception:  # tokenizers raises plain Exception for a file it cannot parse
        # No early count then; the runner loads the tokenizer itself and reports what is wrong.
        return None
    # mlx-lm's stream_generate adds special tokens unless the prompt already starts with BOS.
    add_special = bos_token is None or not prompt.startswith(bos_token)
    return len(tokenizer.encode(prompt, add_special_tokens=add_special).ids)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load(file: str, mtime_ns: int, size: int) -> tuple[Tokenizer, str | None]:
    """The tokenizer and its BOS token; mtime and size are in the key so an edit reloads it."""
    del mtime_ns, size  # only part of the cache key
    return Tokenizer.from_file(file), _bos_token(Path(file).with_name("tokenizer_config.json"))


def _bos_token(config_file: Path) -> str | None:
    try:
        # Only a regular file is opened: a named pipe there would block the daemon.
        if not stat.S_ISREG(os.stat(config_file).st_mode):
            return None
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    bos = config.get("bos_token") if isinstance(config, dict) else None
    # transformers writes a special token either as a string or as an AddedToken-like dict.
    if isinstance(bos, dict):
        bos = bos.get("content")
    return bos if isinstance(bos, str) and bos else None
