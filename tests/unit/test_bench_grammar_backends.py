"""benchmarks.grammar_backends' measure of Kiln's own fill on the tiny model's tokenizer: both runs walk
the same requests through the schema and report their step times (the plumbing, not the speed)."""

from __future__ import annotations

from benchmarks import grammar_backends
from kiln.models.tokenizer import Tokenizer


def test_families_and_one_thread_walk_alike(tiny_gqa_dir, monkeypatch):
    monkeypatch.setattr("kiln.engine.structured.default_fill_threads", lambda: 3)
    rows = grammar_backends.batch_families(Tokenizer(tiny_gqa_dir).hf, batch=6, steps=5)
    assert rows["one_thread"]["threads"] == 1 and rows["families"]["threads"] == 3
    assert rows["one_thread"]["steps"] == rows["families"]["steps"] > 0  # the same walk, seeded
    for row in rows.values():
        assert row["median_ms"] > 0 and row["mean_ms"] > 0
