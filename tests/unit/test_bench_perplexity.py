"""benchmarks/perplexity.py on the tiny model and a few tokens: the windows, the schemes, the report.

The unquantized engine's perplexity is checked against exp(mean NLL) computed here independently, by
transformers on the checkpoint the engine was built from, over the same windows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from benchmarks import perplexity as ppl
from kiln.build import build_engine
from kiln.build.tiny import write_tiny_checkpoint
from kiln.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HF checkpoint dir, float32 engine dir built from it; its engine.json names the checkpoint)."""
    root = tmp_path_factory.mktemp("ppl")
    checkpoint = write_tiny_checkpoint(root / "checkpoint")
    build_engine(checkpoint, root / "engine", dtype="float32", progress=False)
    return Path(checkpoint), root / "engine"


def test_windows_score_every_token_but_the_first_once() -> None:
    assert ppl.windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert ppl.windows(5, 8, 4) == [(0, 5, 1)]
    assert ppl.windows(9, 4, 4) == [(0, 4, 1), (4, 8, 4), (8, 9, 8)]
    for args in [(10, 1, 1), (10, 4, 5), (10, 4, 0), (1, 4, 2)]:
        with pytest.raises(ValueError):
            ppl.windows(*args)


def test_parse_scheme() -> None:
    assert ppl.parse_scheme("none").scheme is None
    s = ppl.parse_scheme("int8-wo-g64")
    assert (s.label, s.scheme, s.group_size) == ("int8-wo-g64", "int8_wo", 64)
    assert (ppl.parse_scheme("fp8").scheme, ppl.parse_scheme("fp8").group_size) == ("fp8", None)
    for bad in ["fp8-g64", "int4", "int8-wo-gx"]:
        with pytest.raises(ValueError):
            ppl.parse_scheme(bad)


def test_corpus_is_pydoc_topics_in_key_order() -> None:
    from pydoc_data.topics import topics

    text = ppl.corpus_text()
    first, second = sorted(topics)[:2]
    assert text.startswith(topics[first] + "\n\n" + topics[second])
    assert len(text) == sum(map(len, topics.values())) + 2 * (len(topics) - 1)


def _independent_nll(checkpoint: Path, ids: list[int], spans: list[tuple[int, int, int]]) -> list[float]:
    """Each scored token's NLL under transformers' model of the checkpoint, window by window."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for start, end, first in spans:
        with torch.no_grad():
            logits = hf(torch.tensor([ids[start:end]])).logits[0].double()
        for pos in range(first, end):
            out.append(-logits[pos - 1 - start].log_softmax(-1)[ids[pos]].item())
    return out


def test_run_reports_each_scheme_and_the_reference_perplexity(tiny, tmp_path: Path) -> None:
    checkpoint, engine = tiny
    schemes = [ppl.parse_scheme(s) for s in ["none", "int8-wo", "int8-wo-g16"]]
    report = ppl.run(engine, schemes, [], num_tokens=40, window=16, stride=8, work_dir=tmp_path)
    data = json.loads(json.dumps(asdict(report)))

    assert data["text"]["tokens"] == 40 and data["text"]["source"] == ppl.TEXT_SOURCE
    assert data["window"] == 16 and data["stride"] == 8
    assert [tuple(w) for w in data["windows"]] == ppl.windows(40, 16, 8)
    assert [r["label"] for r in data["results"]] == ["none", "int8-wo", "int8-wo-g16"]
    assert [(r["quantization"], r["group_size"]) for r in data["results"]] == [
        (None, None),
        ("int8_wo", None),
        ("int8_wo", 16),
    ]
    ref, *quantized = data["results"]
    assert ref["engine"] == str(engine) and ref["top1"] == 1.0 and ref["mean_kl"] == 0.0
    for r in data["results"]:
        assert r["scored_tokens"] == 39
        assert r["perplexity"] == pytest.approx(math.exp(r["mean_nll"]))
    for r in quantized:
        assert r["engine"] == f"built from {checkpoint}"
        # A working int8 layout tracks the reference closely but not exactly (TINY_GATES in
        # tests/model/test_quantized_accuracy.py); a broken one agrees on almost nothing.
        assert 0.6 <= r["top1"] <= 1.0 and 0.0 < r["mean_kl"] < 0.5

    ids = Tokenizer(engine).encode(ppl.corpus_text())[:40]
    nll = _independent_nll(checkpoint, ids, ppl.windows(40, 16, 8))
    assert len(nll) == 39
    assert ref["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_main_writes_json_and_table(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, engine = tiny
    out = tmp_path / "ppl.json"
    assert (
        ppl.main([str(engine), "--tokens", "20", "--window", "16", "--stride", "8", "--json", str(out)]) == 0
    )
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["results"]] == ["none"]
    assert data["results"][0]["scored_tokens"] == 19
    assert "| unquantized float32 |" in capsys.readouterr().out


def test_unknown_scheme_and_short_text_are_refused(tiny, tmp_path: Path) -> None:
    _, engine = tiny
    with pytest.raises(ValueError, match="int4"):
        ppl.main([str(engine), "--schemes", "none,int4"])
    with pytest.raises(ValueError, match="fewer than"):
        ppl.run(engine, [ppl.parse_scheme("none")], [], num_tokens=10**9, work_dir=tmp_path)
