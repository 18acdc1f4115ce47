"""Stop sequences: end a generation before the first one appears, and never show any of it.

Text arrives in pieces (one detokenized segment per token), and a stop sequence can straddle
pieces: "Obs" + "erver:" holds "Observer:". So the end of what has arrived is held back for as
long as it could still become the start of a stop sequence, and let go as soon as it cannot.
What is held is the longest suffix that is a proper prefix of some stop sequence: anything
shorter could let the first characters of a stop sequence out, anything longer is held for no
reason.

The answer does not depend on how the text is cut into pieces: the generation ends where the
first stop sequence is completed, reading the text as one string, and the text ends where that
occurrence starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class StopFilter:
    stops: Sequence[str]
    held: str = ""
    stopped: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if any(not s for s in self.stops):
            raise ValueError("a stop sequence must not be empty")

    def feed(self, text: str) -> str:
        """The part of `text` (and of what was held) that can be shown now.

        After a stop sequence completed, `stopped` is true and nothing more is shown.
        """
        if self.stopped:
            return ""
        buffer = self.held + text
        cut = first_stop(buffer, self.stops)
        if cut is not None:
            self.stopped = True
            self.held = ""
            return buffer[:cut]
        keep = held_suffix(buffer, self.stops)
        self.held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """What is still held when the generation ends without a stop sequence."""
        rest, self.held = self.held, ""
        return "" if self.stopped else rest


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the text must end: the start of the stop sequence that is completed first.

    Among occurrences that end at the same place, the one that starts first (the longest) wins,
    so that none of it is shown. None when no stop sequence occurs in `text`.
    """
    best: tuple[int, int] | None = None  # (end, start)
    for stop in stops:
        # find() gives a sequence's first occurrence, which is also the one that ends first.
        start = text.find(stop)
        if start >= 0:
            candidate = (start + len(stop), start)
            if best is None or candidate < best:
                best = candidate
    return None if best is None else best[1]


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
