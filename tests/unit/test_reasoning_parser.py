"""The deepseek_r1 reasoning parser: reasoning up to `</think>`, a leading `<think>` dropped, all of it
reasoning without a close; streamed in any pieces, it reads as the whole does."""

from __future__ import annotations

import pytest

from kiln.serve.reasoning import ReasoningParser

CASES = [
    # (output, reasoning, answer)
    ("Let me think.</think>\n\nHello!", "Let me think.", "\n\nHello!"),  # the template opened <think>
    ("<think>Hmm</think>Hi", "Hmm", "Hi"),
    ("\n<think>\nHmm</think>Hi", "\nHmm", "Hi"),
    ("still thinking when cut off", "still thinking when cut off", ""),
    ("a<b and </thin k></think>done", "a<b and </thin k>", "done"),
    ("</think>answer only", None, "answer only"),
    ("x</think>a</think>b", "x", "a</think>b"),  # one close: the rest is answer, tags and all
    ("<thinking>no tag</think>", "<thinking>no tag", ""),
    ("", None, ""),
]


@pytest.mark.parametrize(("output", "reasoning", "answer"), CASES)
def test_a_whole_output(output: str, reasoning: str | None, answer: str) -> None:
    assert ReasoningParser.split(output) == (reasoning, answer)


@pytest.mark.parametrize(("output", "reasoning", "answer"), CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_streamed_in_pieces_reads_as_the_whole(
    output: str, reasoning: str | None, answer: str, size: int
) -> None:
    parser = ReasoningParser()
    pieces = []
    for i in range(0, len(output), size):
        pieces += parser.feed(output[i : i + size])
    pieces += parser.finish()
    assert "".join(p.text for p in pieces if p.reasoning) == (reasoning or "")
    assert "".join(p.text for p in pieces if not p.reasoning) == answer
    kinds = [p.reasoning for p in pieces]
    assert kinds == sorted(kinds, reverse=True)  # reasoning first, then answer, never back


def test_a_partial_tag_is_held_back_until_the_next_piece_says() -> None:
    parser = ReasoningParser()
    assert [(p.reasoning, p.text) for p in parser.feed("abc</th")] == [(True, "abc")]
    assert [(p.reasoning, p.text) for p in parser.feed("ink>x")] == [(False, "x")]
    parser = ReasoningParser()
    assert parser.feed("<thi") == []
    assert [(p.reasoning, p.text) for p in parser.feed("nk>a")] == [(True, "a")]
