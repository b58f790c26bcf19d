"""The grammar side of structured outputs: a batch of matchers advanced in one call, and masks filled in the
background equal to the same masks filled inline."""

from __future__ import annotations

import pytest
import torch

from kiln.engine.sampling_params import StructuredOutput
from kiln.engine.structured import Grammars
from kiln.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def grammars(tiny_gqa_dir) -> Grammars:
    return Grammars(Tokenizer(tiny_gqa_dir).hf)


def test_a_batch_advances_together_and_names_the_refused_token(grammars):
    ab = StructuredOutput("regex", "[ab]{3}")
    matchers = [grammars.matcher(ab) for _ in range(3)]
    a, b, z = (grammars.tokenizer.tokenize_str(c)[0] for c in "abz")
    assert grammars.advance([(matchers[0], a), (matchers[1], b), (matchers[2], z)]) == [True, True, False]
    assert matchers[2].is_error() and not matchers[0].is_error()
    assert grammars.advance([(matchers[0], b)]) == [True]
    assert grammars.advance([]) == []


def test_masks_filled_in_the_background_equal_the_inline_ones(grammars):
    schema = StructuredOutput.json_schema({"type": "array", "items": {"type": "integer"}})
    matchers = [grammars.matcher(schema), None, grammars.matcher(StructuredOutput.choice(["yes", "no"]))]
    assert grammars.advance([(matchers[0], grammars.tokenizer.tokenize_str("[")[0])]) == [True]
    words = grammars.mask_words()
    inline = torch.zeros((3, words), dtype=torch.int32)
    grammars.fill_masks(matchers, inline)
    background = torch.zeros((3, words), dtype=torch.int32)
    fill = grammars.start_fill(matchers, background)
    assert fill.future is not None  # two held rows: filled on the filler thread
    assert torch.equal(fill.wait(), inline)
    assert (inline[1] == -1).all() and not (inline[0] == -1).all() and not torch.equal(inline[0], inline[2])
    one = grammars.start_fill([matchers[2]], torch.zeros((1, words), dtype=torch.int32))
    assert one.future is None and torch.equal(one.wait()[0], inline[2])  # one row: filled at once
