"""A structured output with `after` (a reasoning model's `</think>`): free text up to and including the
first `after`, then the constraint, for every kind; the constraint's own options (compact JSON) kept."""

from __future__ import annotations

import pytest

from kiln.engine.sampling_params import SamplingParams, StructuredOutput
from kiln.engine.structured import Grammars
from kiln.errors import RequestValidationError
from kiln.models.tokenizer import Tokenizer

CLOSE = "</think>"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CASES = [
    # (constraint, an answer it takes, one it does not)
    (StructuredOutput.json_schema(SCHEMA), '{"a":1}', '{"a": 1}'),  # compact, as without `after`
    (StructuredOutput("json_object"), '{"x":[1]}', "[1]"),
    (StructuredOutput("regex", r"a/b\d+"), "a/b12", "a-b12"),
    (StructuredOutput.choice(["yes", "no"]), "no", "maybe"),
    (StructuredOutput("grammar", 'start: "{" "a}" "}"'), "{a}}", "{a}"),
]


@pytest.fixture(scope="module")
def grammars(tiny_gqa_dir) -> Grammars:
    return Grammars(Tokenizer(tiny_gqa_dir).hf)


def _feed(grammars: Grammars, matcher, text: str) -> bool:
    return all(matcher.consume_token(t) for t in grammars.tokenizer.tokenize_str(text))


@pytest.mark.parametrize(("constraint", "good", "bad"), CASES)
def test_free_until_the_close_then_held(grammars: Grammars, constraint, good: str, bad: str) -> None:
    held = StructuredOutput(constraint.kind, constraint.spec, after=CLOSE)
    matcher = grammars.matcher(held)
    assert _feed(grammars, matcher, "Hmm, " + good + " or " + bad + "? </thin")  # all free text so far
    assert not matcher.is_accepting()
    assert _feed(grammars, matcher, "k>" + good) and matcher.is_accepting()
    assert not _feed(grammars, grammars.matcher(held), "x" + CLOSE + bad + "!")
    # With no reasoning before it, the close alone opens the answer.
    matcher = grammars.matcher(held)
    assert _feed(grammars, matcher, CLOSE + good) and matcher.is_accepting()


@pytest.mark.parametrize("after", ["", "x" * 65])
def test_after_is_bounded(after: str) -> None:
    with pytest.raises(RequestValidationError, match="after") as refused:
        SamplingParams(structured=StructuredOutput("regex", "a", after=after))
    assert refused.value.field == "structured"
