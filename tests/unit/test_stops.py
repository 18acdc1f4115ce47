"""Stop sequences: the text shown is the text before the first completed stop sequence, however
the generation cuts it into pieces, and nothing is held back longer than it must be."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import pytest

from exod.runners.stops import StopFilter, first_stop, held_suffix

STOP_SETS: list[list[str]] = [
    [],
    ["a"],
    ["ab"],
    ["aba"],
    ["aa"],
    ["abc", "bc", "c"],
    ["ab", "b"],
    ["bca", "abcab"],  # one ends first, the other starts first
    ["cab", "abc"],
    ["aab", "ab"],
]
ALPHABET = "abc"


def reference(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Read the text one character at a time; end where a stop sequence is first completed,
    cutting before the longest of those that end there."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


def cuttings(text: str) -> Iterator[list[str]]:
    """Every way to cut `text` into consecutive pieces (empty pieces included at the ends)."""
    for mask in range(1 << max(len(text) - 1, 0)):
        pieces, start = [], 0
        for i in range(1, len(text)):
            if mask & (1 << (i - 1)):
                pieces.append(text[start:i])
                start = i
        pieces.append(text[start:])
        yield ["", *pieces, ""]


def run(pieces: Sequence[str], stops: Sequence[str]) -> tuple[str, bool]:
    f = StopFilter(stops)
    shown = []
    for piece in pieces:
        out = f.feed(piece)
        shown.append(out)
        # Whatever was shown so far is never taken back: it is a prefix of the whole answer.
        if f.stopped:
            break
        # What is held is exactly the part that could still start a stop sequence.
        assert f.held == piece_tail(shown, f.held, stops)
    if not f.stopped:
        shown.append(f.flush())
    return "".join(shown), f.stopped


def piece_tail(shown: list[str], held: str, stops: Sequence[str]) -> str:
    text = "".join(shown) + held
    n = held_suffix(text, stops)
    return text[len(text) - n :] if n else ""


@pytest.mark.parametrize("stops", STOP_SETS, ids=lambda s: ",".join(s) or "none")
def test_every_cutting_of_every_short_text_gives_the_reference(stops: list[str]) -> None:
    for length in range(6):
        for letters in itertools.product(ALPHABET, repeat=length):
            text = "".join(letters)
            want = reference(text, stops)
            for pieces in cuttings(text):
                assert run(pieces, stops) == want, (text, pieces, stops)


def test_without_stops_every_piece_passes_at_once() -> None:
    f = StopFilter([])
    assert [f.feed(p) for p in ["Once", " upon", " a time"]] == ["Once", " upon", " a time"]
    assert f.flush() == ""
    assert not f.stopped


def test_a_stop_split_over_pieces_is_caught_and_never_shown() -> None:
    f = StopFilter(["Observer:"])
    assert f.feed("Hello. Obs") == "Hello. "
    assert f.held == "Obs"
    assert f.feed("erver: more") == ""
    assert f.stopped


def test_held_text_is_let_go_as_soon_as_it_cannot_start_a_stop() -> None:
    f = StopFilter(["</s>"])
    assert f.feed("a <") == "a "
    assert f.feed("/") == ""
    assert f.feed("x") == "</x"  # "</x" can no longer become "</s>"
    assert f.held == ""


def test_text_held_at_the_end_is_flushed() -> None:
    f = StopFilter(["###"])
    assert f.feed("end ##") == "end "
    assert f.flush() == "##"
    assert f.flush() == ""


def test_after_a_stop_nothing_more_is_shown() -> None:
    f = StopFilter(["x"])
    assert f.feed("abxcd") == "ab"
    assert f.feed("more") == ""
    assert f.flush() == ""


def test_non_ascii_stops() -> None:
    f = StopFilter(["—", "🦊"])  # non-ASCII on purpose
    assert f.feed("Grüße 🦊 und") == "Grüße "
    assert f.stopped


def test_an_empty_stop_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopFilter(["ok", ""])


@pytest.mark.parametrize(
    ("text", "stops", "want"),
    [
        ("abc", ["x"], None),
        ("abc", ["b"], 1),
        ("abcab", ["ab"], 0),
        ("xabcde", ["bcd", "abcde"], 2),  # bcd completes first
        ("xabcd", ["abcd", "bcd"], 1),  # both complete at d: cut before the longer
        ("", ["a"], None),
    ],
)
def test_first_stop(text: str, stops: list[str], want: int | None) -> None:
    assert first_stop(text, stops) == want


@pytest.mark.parametrize(
    ("text", "stops", "want"),
    [
        ("abc", ["x"], 0),
        ("abc", ["cde"], 1),
        ("abc", ["bcd"], 2),
        ("abc", ["abcd"], 3),
        ("abc", ["abc"], 0),  # a whole stop is found, never held
        ("aaa", ["aab"], 2),
        ("ab", ["b", "bc"], 1),
        ("", ["a"], 0),
    ],
)
def test_held_suffix(text: str, stops: list[str], want: int) -> None:
    assert held_suffix(text, stops) == want
