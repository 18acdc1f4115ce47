"""Checking what the user typed before anything is sent: model references, names, prompts, and
where the socket is.

Whatever can be decided here is decided here, so that a typo exits 64 or 66 at once, without a
connection attempt and without a daemon that could be slow, down, or ask a hub.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path

from exoctl.failures import Failure, one_line
from exod.errors import Exit
from exod.home import default_home
from exod.models import MODEL_NAME_PATTERN

NAME_PATTERN = MODEL_NAME_PATTERN
_NAME = re.compile(NAME_PATTERN)
_HF = re.compile(r"hf:[^/\s]+/[^/\s]+")


def _lowercase(text: str) -> str | None:
    """The name that `text` would be without its capitals, when that is a valid name."""
    lower = text.lower()
    return lower if lower != text and _NAME.fullmatch(lower) else None


def _not_a_name(text: str) -> Failure:
    lower = _lowercase(text)
    if lower is not None:
        what = f"model names are lowercase, and {text!r} is not"
        return Failure(Exit.USAGE, one_line(what, f"did you mean {lower!r}?"))
    return Failure(
        Exit.USAGE,
        one_line(
            f"{text!r} is not a valid model name",
            f"use 1 to 64 of a-z 0-9 . _ - starting with a letter or digit ({NAME_PATTERN})",
        ),
    )


def check_name(name: str) -> str:
    """A model name as the registry accepts it, or Failure 64."""
    if not _NAME.fullmatch(name):
        raise _not_a_name(name)
    return name


def looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith((".", "~"))


def model_dir(text: str) -> Path:
    """`text` as an absolute directory that exists, or Failure 66."""
    path = Path(text).expanduser().absolute()
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise Failure(
            Exit.NOT_FOUND,
            one_line(
                f"model directory {path} {problem}",
                "give the directory that holds config.json and the weights",
            ),
            reason="model_not_found",
        )
    return path


def resolve_model(text: str) -> str:
    """What RunRequest.model should say for MODEL as typed.

    `hf:ORG/NAME` goes through as is; anything that looks like a path becomes absolute (the
    daemon's working directory is not ours) and must exist; a bare word is a registered name,
    even when a directory of that name happens to be here (`./NAME` means the directory), so
    that the same command means the same thing in every working directory.
    """
    if text.startswith("hf:"):
        if not _HF.fullmatch(text):
            raise Failure(
                Exit.USAGE, one_line(f"{text!r} is not hf:ORG/NAME", "see `exoctl run --help`")
            )
        return text
    if looks_like_path(text):
        return str(model_dir(text))
    if _NAME.fullmatch(text):
        return text
    if Path(text).is_dir():
        # Most likely the directory was meant: say how to write it.
        lowercase = " (names are lowercase)" if _lowercase(text) else ""
        raise Failure(
            Exit.USAGE,
            one_line(
                f"{text!r} is not a model name{lowercase}, but a directory of that name is here",
                f"to run the directory, write `exoctl run {_as_path(text)}`",
            ),
        )
    if _lowercase(text):
        raise _not_a_name(text)
    raise Failure(
        Exit.USAGE,
        one_line(
            f"{text!r} is neither a model name, a directory nor hf:ORG/NAME",
            "list the names with `exoctl models list`",
        ),
    )


def _as_path(text: str) -> str:
    """`./text`, quoted for a shell where it needs to be."""
    return shlex.quote(f"./{text}")


def explain_unknown_name(failure: Failure, text: str) -> Failure:
    """exod found no model named `text` while a directory of that name is here: say how to run
    the directory, since a bare word never means one (resolve_model)."""
    if failure.reason != "model_not_found" or not _NAME.fullmatch(text) or not Path(text).is_dir():
        return failure
    return Failure(
        failure.code,
        one_line(
            f"model {text!r} not found (a bare word is a registered name, never a directory)",
            f"to run the directory {text} here, write `exoctl run {_as_path(text)}`",
        ),
        failure.reason,
    )


def decode_prompt(data: bytes, source: str) -> str:
    """The prompt's bytes as text; invalid UTF-8 is a usage error, never silently replaced."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Failure(
            Exit.USAGE,
            one_line(
                f"the prompt {source} is not valid UTF-8 (byte {e.start})",
                "convert it first, e.g. with iconv",
            ),
        ) from None


def check_prompt_text(prompt: str) -> str:
    """An argument with bytes that are not UTF-8 arrives with surrogate escapes; refuse it."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise Failure(
            Exit.USAGE,
            one_line("the prompt argument is not valid UTF-8", "convert it first, e.g. with iconv"),
        ) from None
    return prompt


def default_socket(environ: Mapping[str, str]) -> Path:
    """EXOD_SOCKET, else exod.sock in EXOD_HOME, else in the platform's state dir: the same
    choice that exod makes (exod/home.py), so that both ends meet without flags."""
    if environ.get("EXOD_SOCKET"):
        return Path(environ["EXOD_SOCKET"]).expanduser().absolute()
    home = environ.get("EXOD_HOME")
    base = Path(home) if home else default_home(environ)
    return base.expanduser().absolute() / "exod.sock"
