"""Stop strings: where a request's text must end, and how much of it is safe to stream now.

Rules of the interface:
- `check` is called after every detokenizer step with the request's whole text so far; only the last
  `new_text_len` characters are new. Text before them was already checked, so a match is searched only
  where it can newly end: inside the new text (a stop string may start in old text and span deltas).
  Text this checker already scanned is not scanned again, even when offered as new once more.
- The first stop string to be *completed* reading left to right wins (ties: the one that starts first,
  i.e. the longest). This makes the result independent of how the text was split into deltas: a stream
  of one character per call stops exactly where a single call with the whole text does.
- `cut` is where the output text ends: at the stop string's start, or after it when
  `include_stop_str_in_output`. `safe_len` is how much text may be sent to a client now: everything up to
  `cut` after a match; otherwise all but the longest suffix that is a proper prefix of some stop string,
  so a partial match is never streamed and then retracted. `safe_len` never decreases between calls.
- Lengths and indices count Python characters (code points), so multi-byte characters are never split.
- Time and memory are linear in the lengths of the stop strings and the text: each stop string runs as a
  Knuth-Morris-Pratt automaton over the text, resumed where the last call left it (the text only grows
  between calls of one checker), so a long stop string cannot make a request expensive.
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


def _failure(pattern: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of pattern[:i + 1] that is
    also its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class StopChecker:
    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]  # an empty stop string would match everywhere
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._fail = [_failure(s) for s in self.stop]
        # Per stop string: how many of its first characters end the text scanned so far (< its length).
        self._state = [0] * len(self.stop)
        self._scanned = 0  # characters of the text the states describe

    def check(self, text: str, new_text_len: int) -> StopResult:
        old_len = len(text) - new_text_len
        if not self.stop:
            return StopResult(stop=None, cut=None, safe_len=len(text))
        # Resume where the last call ended; a caller whose text skipped ahead (or a fresh checker given
        # old text) warms the automata on the old text's last characters, the only ones a match could
        # still start in.
        warm_from = old_len - self._max_len + 1
        if len(text) < self._scanned or self._scanned < warm_from:
            self._state = [0] * len(self.stop)
            self._scanned = max(0, warm_from)
        for pos in range(self._scanned, len(text)):
            ch = text[pos]
            matched: str | None = None
            for i, stop in enumerate(self.stop):
                k, fail = self._state[i], self._fail[i]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    # Ending here: the longest such stop string starts first. A match wholly in old text
                    # would have ended the request before, so it is only warming.
                    if pos >= old_len and (matched is None or len(stop) > len(matched)):
                        matched = stop
                    k = fail[k - 1]
                self._state[i] = k
            self._scanned = pos + 1
            if matched is not None:
                end = pos + 1
                cut = end if self.include_stop_str_in_output else end - len(matched)
                return StopResult(stop=matched, cut=cut, safe_len=cut)
        # The longest suffix of the text that is a proper prefix of some stop string is held back.
        return StopResult(stop=None, cut=None, safe_len=len(text) - max(self._state))
