"""The grammar side of structured outputs: masks filled in the background equal to the same masks filled
inline, and requests' matchers copied in turn from one cached matcher per grammar and filling thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kiln.engine import structured
from kiln.engine.sampling_params import StructuredOutput
from kiln.engine.structured import Grammars
from kiln.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def grammars(tiny_gqa_dir) -> Grammars:
    return Grammars(Tokenizer(tiny_gqa_dir).hf)


def test_masks_filled_in_the_background_equal_the_inline_ones(grammars):
    schema = StructuredOutput.json_schema({"type": "array", "items": {"type": "integer"}})
    matchers = [grammars.matcher(schema), None, grammars.matcher(StructuredOutput.choice(["yes", "no"]))]
    assert matchers[0].consume_token(grammars.tokenizer.tokenize_str("[")[0])
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


def test_a_background_fill_is_under_way_when_start_fill_returns(tiny_gqa_dir, monkeypatch):
    # The filler thread must not wait for the GIL behind the engine's thread: start_fill hands it over.
    grammars = Grammars(Tokenizer(tiny_gqa_dir).hf, threads=2)
    schema = StructuredOutput.json_schema({"type": "object"})
    entered = threading.Event()

    def slow_fill(rows, mask):
        entered.set()
        time.sleep(0.2)

    matchers = [grammars.matcher(schema), grammars.matcher(schema)]
    mask = torch.zeros((2, grammars.mask_words()), dtype=torch.int32)
    grammars.start_fill(matchers, mask).wait()  # the filler thread exists and is idle, as in the engine
    monkeypatch.setattr(grammars, "_fill_rows", slow_fill)
    fill = grammars.start_fill(matchers, mask)
    assert entered.is_set() and not fill.future.done()
    fill.wait()


def test_a_buffer_made_in_inference_mode_fills_on_the_helper_thread(grammars):
    # The engine's runner allocates its pinned mask buffers inside inference mode; the fill runs elsewhere.
    schema = StructuredOutput.json_schema({"type": "object"})
    matchers = [grammars.matcher(schema), grammars.matcher(schema)]
    with torch.inference_mode():
        buffer = torch.zeros((2, grammars.mask_words()), dtype=torch.int32)
    fill = grammars.start_fill(matchers, buffer)
    assert fill.future is not None and torch.equal(fill.wait()[0], fill.wait()[1])


def test_copies_of_a_cached_grammar_do_not_share_their_state(grammars):
    regex = StructuredOutput("regex", "[ab]{3}")
    first, second = grammars.matcher(regex), grammars.matcher(regex)
    a = grammars.tokenizer.tokenize_str("a")[0]
    assert (
        first.consume_token(a) and first.consume_token(a) and first.consume_token(a) and first.is_accepting()
    )
    assert not second.is_accepting() and grammars.matcher(regex).consume_token(a)


def test_requests_take_the_families_of_a_grammar_in_turn(tiny_gqa_dir):
    grammars = Grammars(Tokenizer(tiny_gqa_dir).hf, threads=3)
    regex, choice = StructuredOutput("regex", "[ab]{3}"), StructuredOutput.choice(["yes", "no"])
    assert [grammars.matcher(regex).family for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [grammars.matcher(choice).family for _ in range(2)] == [0, 1]  # each grammar counts its own
    with pytest.raises(ValueError, match="at least 1"):
        Grammars(Tokenizer(tiny_gqa_dir).hf, threads=0)


def test_a_batch_across_families_fills_each_row_as_alone(tiny_gqa_dir):
    """Rows go to the pool grouped by family, not in batch order: each mask must still land in its own row."""
    grammars = Grammars(Tokenizer(tiny_gqa_dir).hf, threads=3)
    tokens = {text: grammars.tokenizer.tokenize_str(text)[0] for text in ("[", "1", ",", "a")}
    array = StructuredOutput.json_schema({"type": "array", "items": {"type": "integer"}})
    regex = StructuredOutput("regex", "[ab]{3}")
    matchers = [grammars.matcher(array if i % 2 else regex) for i in range(8)]
    for i, matcher in enumerate(matchers):  # different states: 0 to 3 tokens into the output
        fed = ["[", "1", ","][: i % 4] if i % 2 else ["a"] * (i % 4)
        assert all(matcher.consume_token(tokens[text]) for text in fed)
    assert len({m.family for m in matchers}) == 3
    batch = [*matchers[:3], None, *matchers[3:]]
    words = grammars.mask_words()
    together = torch.zeros((len(batch), words), dtype=torch.int32)
    grammars.fill_masks(batch, together)
    for i, matcher in enumerate(batch):
        alone = torch.zeros((1, words), dtype=torch.int32)
        grammars.fill_masks([matcher], alone)
        assert torch.equal(together[i], alone[0]), f"row {i}"
    assert len({tuple(row.tolist()) for row in together}) >= 4  # the states differ, so do their masks


def test_the_least_recently_used_grammars_leave_the_cache_first(tiny_gqa_dir, monkeypatch):
    monkeypatch.setattr(structured, "MATCHER_CACHE_SIZE", 4)
    grammars = Grammars(Tokenizer(tiny_gqa_dir).hf, threads=3)
    a, b, c = (StructuredOutput("regex", r) for r in ("a+", "b+", "c+"))
    for _ in range(3):
        grammars.matcher(a)  # three families
    grammars.matcher(b)
    assert grammars.cached_matchers == 4
    grammars.matcher(b)  # a fifth: `a`, the least recently used, goes with its three
    assert grammars.cached_matchers == 2
    assert grammars.matcher(a).family == 0  # compiled again, from its first family
    grammars.matcher(c)  # b (two) is now the oldest: 1 + 1 + 2 = 4 fits
    assert grammars.cached_matchers == 4
    for _ in range(2):  # c's second and third families: b goes first, then nothing needs to
        grammars.matcher(c)
    assert grammars.cached_matchers == 4  # a (1) and c (3)
    monkeypatch.setattr(structured, "MATCHER_CACHE_SIZE", 2)
    assert grammars.matcher(c).family == 0  # a goes; c alone is past the bound but is the one in use
    assert grammars.cached_matchers == 3


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (4, 3), (16, 4), (128, 4)])
def test_default_fill_threads_is_most_of_the_cores_up_to_the_cap(monkeypatch, cores, threads):
    monkeypatch.setattr(structured.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert structured.default_fill_threads() == threads
