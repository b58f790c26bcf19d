"""Accuracy gates of the native quantized engines: next-token distributions against the unquantized engine.

The text is the Zen of Python (`this` in the standard library, decoded): a real English text every
Python ships, unchanged since 2004. Each engine computes the logits of every position of the text in one
prefill (kiln.bench.accuracy, shared with benchmarks/perplexity.py); the quantized engine is built from
the same checkpoint, both float32 on the CPU, so the only difference is the scheme. Measured:

- top-1 agreement: the share of positions where both engines' most likely next token is the same;
- KL divergence KL(unquantized || quantized) per position, in nats, averaged over the text;
- perplexity of the text under each engine (printed with `-s`, for docs/quantization.md).

Thresholds are what was measured on the 2-core CPU machine (2026-12-05) with a margin, stated here and in
docs/quantization.md. The tiny model's random weights make its logits chaotic, so its gates are looser;
they catch a broken scale layout or dequantization (which gives near-zero agreement), not fine drifts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accuracy_gates import check_gate, zen_of_python
from engine_checks import assert_greedy_is_the_prefill_argmax

from kiln import LLM
from kiln.bench.accuracy import text_logits
from kiln.build import build_engine, build_tiny_engine
from kiln.models.tokenizer import Tokenizer

# (quantization, group size) -> (least top-1 agreement, most mean KL in nats). int8_sq is calibrated on
# CALIB_SAMPLES samples of 512 tokens of the default set (pydoc_data.topics), alpha 0.5.
SMOLLM2_GATES = {
    ("int8_wo", None): (0.92, 0.045),  # measured 0.946, 0.029
    ("int8_wo", 64): (0.90, 0.03),  # measured 0.931, 0.019
    ("fp8", None): (0.68, 0.45),  # measured 0.739, 0.350
    ("int8_sq", None): (0.78, 0.19),  # measured 0.833, 0.149
}
TINY_GATES = {
    ("int8_wo", None): (0.80, 0.16),  # measured 0.849, 0.115
    ("int8_wo", 16): (0.85, 0.11),  # measured 0.896, 0.076
    ("fp8", None): (0.45, 2.2),  # measured 0.504, 1.707
    ("int8_sq", None): (0.72, 0.27),  # measured 0.798, 0.193
}
# The calibration samples of the int8_sq gates (kiln.build.calibrate.CALIB_SEQ_LEN tokens each): a few
# keep the test fast; the statistics are deterministic, so the figures are too.
CALIB_SAMPLES = {"tiny": 4, "smollm2": 4}


def _options(scheme: str, model: str) -> dict:
    return {"calib_size": CALIB_SAMPLES[model]} if scheme == "int8_sq" else {}


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], torch.Tensor]:
    engine = tmp_path_factory.mktemp("tiny-quant") / "float32"
    build_tiny_engine(engine)
    ids = Tokenizer(engine).encode(zen_of_python())
    return engine, ids, text_logits(engine, ids)


@pytest.mark.parametrize(("scheme", "group_size"), list(TINY_GATES))
def test_tiny_quantized_engine_tracks_the_unquantized_one(
    tiny_reference, tmp_path: Path, scheme: str, group_size: int | None
) -> None:
    _, ids, reference = tiny_reference
    engine = tmp_path / "engine"
    build_tiny_engine(engine, quantization=scheme, quant_group_size=group_size, **_options(scheme, "tiny"))
    check_gate(
        f"tiny {scheme} g={group_size}",
        reference,
        text_logits(engine, ids),
        ids,
        TINY_GATES[scheme, group_size],
    )


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "group_size"), list(SMOLLM2_GATES))
def test_smollm2_quantized_engine_tracks_the_unquantized_one(
    smollm2_gguf: Path, smollm2_reference, tmp_path: Path, scheme: str, group_size: int | None
) -> None:
    ids, reference = smollm2_reference
    engine = tmp_path / "engine"
    build_engine(
        smollm2_gguf,
        engine,
        dtype="float32",
        quantization=scheme,
        quant_group_size=group_size,
        progress=False,
        **_options(scheme, "smollm2"),
    )
    check_gate(
        f"SmolLM2 {scheme} g={group_size}",
        reference,
        text_logits(engine, ids),
        ids,
        SMOLLM2_GATES[scheme, group_size],
    )


@pytest.mark.parametrize("scheme", ["int8-wo", "fp8", "int8-sq"])
def test_greedy_generation_through_llm_engine(tmp_path: Path, scheme: str) -> None:
    """A quantized engine dir runs the whole engine path (scheduler, paged prefill, decode steps, a batch
    of two prompts); its greedy tokens equal the model's own one-prefill argmax continuation."""
    engine = tmp_path / "engine"
    build_tiny_engine(engine, quantization=scheme, **({"calib_size": 2} if scheme == "int8-sq" else {}))
    assert_greedy_is_the_prefill_argmax(LLM(engine, device="cpu"), engine)
