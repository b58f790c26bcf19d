"""Stop strings: where a request's text must end, and how much of it is safe to stream now.

Rules of the interface:
- `check` is called after every detokenizer step with the request's whole text so far; only the last
  `new_text_len` characters are new. Text before them was already checked, so a match is searched only
  where it can newly end: inside the new text (a stop string may start in old text and span deltas).
- The first stop string to be *completed* reading left to right wins (ties: the one that starts first,
  i.e. the longest). This makes the result independent of how the text was split into deltas: a stream
  of one character per call stops exactly where a single call with the whole text does.
- `cut` is where the output text ends: at the stop string's start, or after it when
  `include_stop_str_in_output`. `safe_len` is how much text may be sent to a client now: everything up to
  `cut` after a match; otherwise all but the longest suffix that is a proper prefix of some stop string,
  so a partial match is never streamed and then retracted. `safe_len` never decreases between calls.
- Lengths and indices count Python characters (code points), so multi-byte characters are never split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class StopResult:
    stop: str | None  # the stop string that matched; None: no match yet
    cut: int | None  # where the output text ends when stop matched; None otherwise
    safe_len: int  # characters of text that may be released to a streaming client now

    @property
    def stopped(self) -> bool:
        return self.stop is not None


class StopChecker:
    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]  # an empty stop string would match everywhere
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_len = max((len(s) for s in self.stop), default=0)
        # Every proper prefix of every stop string: a text suffix in this set might still become a stop.
        self._prefixes = {s[:i] for s in self.stop for i in range(1, len(s))}

    def check(self, text: str, new_text_len: int) -> StopResult:
        old_len = len(text) - new_text_len
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self.stop:
            # A match found before would have ended the request, so this one must end after old_len.
            start = text.find(stop, max(0, old_len - len(stop) + 1))
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is not None:
            end, start, stop = best
            cut = end if self.include_stop_str_in_output else start
            return StopResult(stop=stop, cut=cut, safe_len=cut)
        return StopResult(stop=None, cut=None, safe_len=len(text) - self._held_back(text))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for size in range(min(self._max_len - 1, len(text)), 0, -1):
            if text[-size:] in self._prefixes:
                return size
        return 0
