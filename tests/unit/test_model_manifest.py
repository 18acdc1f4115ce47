"""A model directory's manifest and content key, and the checks a receiver makes of a manifest
it is sent (exod/models/manifest.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from exod.models.manifest import (
    MAX_FILES,
    ManifestFile,
    canonical_text,
    check_manifest,
    check_path,
    key_of,
    manifest_of,
)


def _file(path: str, content: bytes = b"x") -> ManifestFile:
    return ManifestFile(path, len(content), hashlib.sha256(content).digest())


def test_the_key_is_the_sha256_of_the_sorted_canonical_text() -> None:
    a, b = _file("model.safetensors", b"weights"), _file("config.json", b"{}")
    text = canonical_text([a, b])
    assert text == (
        f"{b.sha256.hex()} 2 config.json\n{a.sha256.hex()} 7 model.safetensors\n".encode()
    )
    assert key_of([a, b]) == key_of([b, a]) == hashlib.sha256(text).hexdigest()
    # Any byte of any file changes it.
    assert key_of([a, _file("config.json", b"{ }")]) != key_of([a, b])


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "an empty path"),
        ("/etc/passwd", "the absolute path"),
        ("../x", "'..' part"),
        ("a/../../x", "'..' part"),
        ("a/./b", "'..' part"),
        ("a//b", "'..' part"),
        ("a/", "'..' part"),
        ("a\\..\\b", "with a backslash or a control character"),
        ("a\nb", "with a backslash or a control character"),
        ("a\0b", "with a backslash or a control character"),
        ("x" * 256, "a part of which is longer than 255"),
        ("a/" * 600, "a path longer than 1024 characters"),
    ],
)
def test_a_path_outside_the_directory_or_odd_is_refused(path: str, why: str) -> None:
    said = check_path(path)
    assert said is not None and why in said


@pytest.mark.parametrize(
    "path", ["config.json", "tokenizer/vocab.json", "model-00001-of-00002.safetensors", "é.txt"]
)
def test_a_plain_relative_path_is_taken(path: str) -> None:
    assert check_path(path) is None


def test_a_manifest_is_checked_whole() -> None:
    good = [_file("config.json"), _file("sub/w.bin")]
    assert check_manifest(key_of(good), good) is None
    cases = [
        ("XYZ", good, "its key is not 64 lowercase hex digits"),
        ("ab" * 32, good, "its key is not the SHA-256 of its list of files"),
        (None, [*good, _file("config.json")], "it names 'config.json' twice"),
        (None, [*good, _file("sub")], "it names 'sub' both as a file and as a directory"),
        (None, [ManifestFile("a", -1, bytes(32))], "it gives 'a' a negative size"),
        (None, [ManifestFile("a", 1, b"short")], "its digest of 'a' is not a SHA-256"),
        (None, [_file("../a")], "it names the path '../a'"),
        (None, [_file(f"f{i}") for i in range(MAX_FILES + 1)], "more than 4096"),
    ]
    for key, files, why in cases:
        said = check_manifest(key or key_of(files), files)
        assert said is not None and why in said, (why, said)


def test_manifest_of_reads_every_byte_skips_hidden_files_and_follows_file_links(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\1" * 3_000_000)
    (tmp_path / ".DS_Store").write_bytes(b"mac")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_bytes(b"tool")
    blob = tmp_path.parent / f"{tmp_path.name}-blob"
    blob.write_bytes(b"linked")
    (tmp_path / "tokenizer.json").symlink_to(blob)  # as a Hugging Face snapshot holds files
    manifest = manifest_of(tmp_path)
    assert [(f.path, f.size) for f in manifest.files] == [
        ("config.json", 2),
        ("sub/w.bin", 3_000_000),
        ("tokenizer.json", 6),
    ]
    assert manifest.files[1].sha256 == hashlib.sha256(b"\1" * 3_000_000).digest()
    assert manifest.total == 3_000_008
    assert check_manifest(manifest.key, list(manifest.files)) is None


def test_manifest_of_refuses_a_file_that_is_not_a_regular_one(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # would block an open forever: refused from its stat
    with pytest.raises(ValueError, match="is not a regular file"):
        manifest_of(tmp_path)
