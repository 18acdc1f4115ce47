"""The model cache (exod/models/cache.py): which entries make room (pure), and the cache on a
real directory: reserve, commit, abort, eviction, pins, leftovers; and the receiver that writes
a pushed directory while hashing it (exod/models/receive.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from exod.errors import ExoError
from exod.models.cache import Entry, ModelCache, evictions
from exod.models.manifest import Manifest, ManifestFile
from exod.models.receive import Receiver

KEYS = [c * 64 for c in "0123456789abcdef"]
ME = "n-aaaaaaaaaaaa"


def _e(i: int, size: int, used: float, pinned: bool = False) -> Entry:
    return Entry(KEYS[i], size, used, pinned)


# --- evictions (pure) --------------------------------------------------------------------------


def test_least_recently_used_go_first_and_only_as_many_as_needed() -> None:
    entries = [_e(0, 10, 3.0), _e(1, 10, 1.0), _e(2, 10, 2.0)]
    assert evictions(entries, 0) == []
    assert evictions(entries, -5) == []
    assert evictions(entries, 1) == [entries[1]]
    assert evictions(entries, 11) == [entries[1], entries[2]]
    assert evictions(entries, 30) == [entries[1], entries[2], entries[0]]
    assert evictions(entries, 31) is None


def test_a_pinned_entry_is_never_chosen_even_when_oldest() -> None:
    entries = [_e(0, 10, 1.0, pinned=True), _e(1, 10, 2.0), _e(2, 10, 3.0)]
    assert evictions(entries, 5) == [entries[1]]
    assert evictions(entries, 20) == [entries[1], entries[2]]
    assert evictions(entries, 21) is None  # the pinned 10 would be needed


def test_ties_in_time_go_by_key() -> None:
    entries = [_e(2, 10, 1.0), _e(1, 10, 1.0)]
    assert evictions(entries, 1) == [entries[1]]


# --- the cache on disk -------------------------------------------------------------------------


def _fill(cache: ModelCache, key: str, size: int) -> Path:
    incoming = cache.reserve(key, size)
    (incoming.path / "w.bin").write_bytes(b"\0" * size)
    return incoming.commit()


def test_an_entry_is_hidden_until_committed_and_gone_when_aborted(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "models", 1000, ME)
    incoming = cache.reserve(KEYS[0], 10)
    assert incoming.path.name.startswith(".incoming-")
    assert not cache.has(KEYS[0]) and cache.entries() == []
    incoming.abort()
    assert os.listdir(cache.root) == []
    path = _fill(cache, KEYS[0], 10)
    assert path == cache.root / KEYS[0] and cache.has(KEYS[0])
    assert [(e.key, e.size) for e in cache.entries()] == [(KEYS[0], 10)]


def test_a_second_copy_of_the_same_key_is_dropped_at_commit(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "models", 1000, ME)
    first, second = cache.reserve(KEYS[0], 10), cache.reserve(KEYS[0], 10)
    (first.path / "a").write_bytes(b"1")
    (second.path / "a").write_bytes(b"1")
    first.commit()
    assert second.commit() == cache.root / KEYS[0]
    assert os.listdir(cache.root) == [KEYS[0]]


def test_room_is_made_least_recently_used_first_and_counts_what_is_being_received(
    tmp_path: Path,
) -> None:
    cache = ModelCache(tmp_path / "models", 30, ME)
    for i in range(3):
        _fill(cache, KEYS[i], 10)
        os.utime(cache.root / KEYS[i], (100 + i, 100 + i))
    cache.has(KEYS[0])  # a use: 0 is the most recent now
    receiving = cache.reserve(KEYS[3], 10)  # 1 goes
    assert sorted(e.key for e in cache.entries()) == [KEYS[0], KEYS[2]]
    cache.reserve(KEYS[4], 10)  # 2 goes: the 10 being received count
    assert [e.key for e in cache.entries()] == [KEYS[0]]
    receiving.abort()
    assert not any(p.name.startswith(".evicting-") for p in cache.root.iterdir())


def test_an_entry_in_use_is_kept_and_a_push_that_cannot_fit_evicts_nothing(
    tmp_path: Path,
) -> None:
    cache = ModelCache(tmp_path / "models", 25, ME)
    _fill(cache, KEYS[0], 10)
    _fill(cache, KEYS[1], 10)
    with cache.use(KEYS[0]) as path, cache.use(KEYS[1]):
        assert path == cache.root / KEYS[0]
        with pytest.raises(ExoError) as refused:
            cache.reserve(KEYS[2], 10)
        assert refused.value.reason == "disk_full"
        assert "EXOD_MODEL_CACHE_BYTES" in refused.value.message
        assert "in use by models running there" in refused.value.message
        assert len(cache.entries()) == 2
    cache.reserve(KEYS[2], 10)  # no longer in use: one goes
    assert len(cache.entries()) == 1


def test_more_than_the_bound_is_refused_at_once(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "models", 5 << 20, ME)
    with pytest.raises(ExoError) as refused:
        cache.reserve(KEYS[0], 6 << 20)
    assert refused.value.message == (
        f"node {ME} keeps at most 5 MiB of models for its cluster (EXOD_MODEL_CACHE_BYTES), and "
        "this one needs 6 MiB: raise EXOD_MODEL_CACHE_BYTES there (a size, or a percentage of "
        "its disk)"
    )
    assert not cache.root.exists()


def test_using_an_entry_that_is_not_there_is_model_not_found(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "models", 100, ME)
    with pytest.raises(ExoError) as missing, cache.use(KEYS[0]):
        pass
    assert missing.value.reason == "model_not_found"
    with pytest.raises(ValueError, match="not a content key"):
        cache.path("../x")


def test_leftovers_of_a_stopped_exod_are_deleted_at_start(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "models", 100, ME)
    _fill(cache, KEYS[0], 10)
    cache.reserve(KEYS[1], 10)  # this exod "stops" here
    (cache.root / ".evicting-x").mkdir()
    ModelCache(tmp_path / "models", 100, ME).clean()
    assert os.listdir(cache.root) == [KEYS[0]]


# --- the receiver ------------------------------------------------------------------------------


def _manifest(files: dict[str, bytes]) -> Manifest:
    return Manifest(
        tuple(ManifestFile(p, len(c), hashlib.sha256(c).digest()) for p, c in sorted(files.items()))
    )


def test_the_receiver_writes_each_file_as_it_comes_and_makes_empty_ones_at_the_end(
    tmp_path: Path,
) -> None:
    files = {"a/w.bin": b"0123456789", "empty": b"", "c.json": b"{}"}
    receiver = Receiver(tmp_path, _manifest(files), "refusing")
    receiver.write("a/w.bin", 0, b"01234")
    receiver.write("a/w.bin", 5, b"56789")
    receiver.write("c.json", 0, b"{}")
    receiver.finish()
    assert {p: (tmp_path / p).read_bytes() for p in files} == files
    assert receiver.received == 12


@pytest.mark.parametrize(
    ("writes", "says"),
    [
        ([("a", 0, b"xyz")], "it sent 'a' whose SHA-256 is"),
        ([("a", 1, b"abc")], "it sent 'a' at offset 1 where 0 came"),
        ([("a", 0, b"abcd")], "it sent more than the 3 bytes of 'a'"),
        ([("a", 0, b"abc"), ("a", 3, b"d")], "it sent more than the 3 bytes of 'a'"),
        ([("z", 0, b"abc")], "it sent bytes of 'z', which its manifest does not list"),
        ([("a", 0, b"a"), ("b", 0, b"b")], "bytes of 'b' before the end of 'a' (1 of 3 bytes)"),
    ],
)
def test_the_receiver_refuses_what_the_manifest_does_not_say(
    tmp_path: Path, writes: list[tuple[str, int, bytes]], says: str
) -> None:
    receiver = Receiver(tmp_path, _manifest({"a": b"abc", "b": b"b"}), "node x refused y")
    with pytest.raises(ExoError) as refused:
        for path, offset, data in writes:
            receiver.write(path, offset, data)
    receiver.close()
    assert refused.value.reason == "weights_corrupt"
    assert refused.value.message.startswith("node x refused y: it sent ")
    assert says in refused.value.message


def test_a_stream_that_ends_short_is_corrupt(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path, _manifest({"a": b"abc", "b": b"b"}), "r")
    receiver.write("a", 0, b"abc")
    with pytest.raises(ExoError, match="none of 'b' before the stream ended"):
        receiver.finish()


def test_the_receiver_never_follows_a_link_out_of_its_directory(tmp_path: Path) -> None:
    inside = tmp_path / "in"
    inside.mkdir()
    outside = tmp_path / "target"
    (inside / "a").symlink_to(outside)  # planted: the receiver's directory is never shared
    receiver = Receiver(inside, _manifest({"a": b"abc"}), "r")
    with pytest.raises(ExoError):
        receiver.write("a", 0, b"abc")
    assert not outside.exists()


def test_a_cache_bounded_at_zero_takes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ExoError) as refused:
        ModelCache(tmp_path / "models", 0, ME).reserve(KEYS[0], 1)
    assert refused.value.message == (
        f"node {ME} keeps no models for its cluster (EXOD_MODEL_CACHE_BYTES is 0): set "
        "EXOD_MODEL_CACHE_BYTES there to a size, or a percentage of its disk"
    )
