"""Stop strings: matches across deltas, the earliest-completed rule, and the streaming hold-back."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.engine.stop import StopChecker, StopResult


def stream(checker: StopChecker, deltas: list[str]) -> tuple[StopResult, str, list[int]]:
    """Feed deltas one by one like the output processor; returns the last result, the released text and
    every safe_len seen."""
    text = ""
    seen: list[int] = []
    result = StopResult(stop=None, cut=None, safe_len=0)
    for delta in deltas:
        text += delta
        result = checker.check(text, len(delta))
        seen.append(result.safe_len)
        if result.stopped:
            break
    return result, text[: result.safe_len], seen


def test_stop_spanning_one_char_deltas():
    result, released, _ = stream(StopChecker(["END"]), list("abcENDxyz"))
    assert (result.stop, result.cut, released) == ("END", 3, "abc")


def test_stop_at_the_very_start():
    result = StopChecker(["Hi"]).check("Hi there", 8)
    assert (result.stop, result.cut, result.safe_len) == ("Hi", 0, 0)


def test_include_stop_str_in_output():
    result, released, _ = stream(
        StopChecker(["END"], include_stop_str_in_output=True), ["ab", "cE", "N", "Dx"]
    )
    assert (result.stop, result.cut, released) == ("END", 6, "abcEND")


def test_earliest_match_wins():
    result = StopChecker(["world", "lo"]).check("hello world", 11)
    assert (result.stop, result.cut) == ("lo", 3)


def test_overlapping_stop_strings_first_completed_wins_whatever_the_deltas():
    # "bc" completes at 3, before "abcd" (which starts earlier) completes at 4.
    checker = StopChecker(["abcd", "bc"])
    assert checker.check("xabcd", 5).stop == "bc"
    result, released, _ = stream(checker, list("xabcd"))
    assert (result.stop, result.cut, released) == ("bc", 2, "xa")
    # Both complete at the same character: the one starting first (the longer one) wins.
    assert StopChecker(["bc", "abc"]).check("xabc", 4).stop == "abc"


def test_only_the_new_region_is_searched():
    checker = StopChecker(["stop"])
    # "stop" lies wholly in old text: a caller that already checked it would have finished.
    assert not checker.check("stop and more", 4).stopped
    # A stop string starting in old text and ending in the new text is found.
    assert checker.check("xxst" + "op", 2).cut == 2


def test_partial_prefix_is_held_then_released_when_it_fails():
    checker = StopChecker(["</answer>"])
    assert checker.check("The </an", 8).safe_len == 4
    assert checker.check("The </ans", 1).safe_len == 4
    result = checker.check("The </ansX", 1)
    assert not result.stopped and result.safe_len == 10


def test_longest_held_suffix_across_several_stop_strings():
    checker = StopChecker(["abc", "bcd", "xyz"])
    assert checker.check("zzab", 4).safe_len == 2  # "ab" could become "abc"
    assert checker.check("zzabb", 1).safe_len == 4  # only "b" (of "bcd") is held
    assert checker.check("q", 1).safe_len == 1


def test_multibyte_characters():
    checker = StopChecker(["😀!", "世界"])
    result, released, _ = stream(checker, ["hé", "llo 😀", "?", " 世", "界 more"])
    assert (result.stop, released) == ("世界", "héllo 😀? ")
    assert checker.check("abc 😀", 1).safe_len == 4  # the emoji alone is held: one character, not 4 bytes


def test_no_stop_strings_releases_everything():
    checker = StopChecker([])
    assert checker.check("anything", 8) == StopResult(stop=None, cut=None, safe_len=8)
    assert StopChecker([""]).check("abc", 3).safe_len == 3  # empty stop strings are ignored


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab世😀", max_size=20),
    stops=st.lists(st.text(alphabet="ab世😀", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 20), max_size=8),
    include=st.booleans(),
)
def test_streaming_agrees_with_one_call_and_never_retracts(text, stops, cuts, include):
    checker = StopChecker(stops, include_stop_str_in_output=include)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in pairwise(bounds)]
    result, released, seen = stream(checker, deltas)
    whole = StopChecker(stops, include_stop_str_in_output=include).check(text, len(text))
    assert (result.stop, result.cut) == (whole.stop, whole.cut)
    assert seen == sorted(seen)  # safe_len never decreases
    if result.stopped:
        assert released == text[: whole.cut]
    else:
        assert released == text[: whole.safe_len]
        # What is held is a proper prefix of a stop string, never more.
        held = text[whole.safe_len :]
        assert held == "" or any(s.startswith(held) and s != held for s in stops)


def test_cost_is_linear_in_the_stop_string():
    """A 30,000-character stop string once took ~240 MiB (every prefix kept in a set) and quadratic time
    per check; the automata keep a few integers per character."""
    import tracemalloc

    stop = "ab" * 15_000
    tracemalloc.start()
    try:
        checker = StopChecker([stop])
        text = ""
        for _ in range(200):  # a text that keeps matching the stop string's prefix: the worst hold-back
            text += "ab"
            result = checker.check(text, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not result.stopped and result.safe_len == 0
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_already_scanned_text_is_not_scanned_again():
    """The output processor offers held-back text again as new; what the checker scanned is not re-read,
    so a match is still found once, where it completes."""
    checker = StopChecker(["</a>"])
    assert checker.check("x</", 3).safe_len == 1
    assert checker.check("x</a", 3).safe_len == 1  # "</a" offered again with one more character
    result = checker.check("x</a>y", 5)
    assert (result.stop, result.cut) == ("</a>", 1)
