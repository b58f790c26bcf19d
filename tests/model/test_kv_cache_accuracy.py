"""Accuracy gates of the fp8 KV cache: next-token distributions against the same engine with a cache in
its own dtype.

The text and the measures are tests/model/test_quantized_accuracy.py's: the Zen of Python (`this`,
decoded), the logits of every position in one prefill (kiln.bench.accuracy; Kiln's attention always reads
K and V back from the paged cache, so a prefill sees the fp8 cache as decoding does), top-1 agreement,
mean KL(16-bit cache || fp8 cache) in nats, perplexity (printed with `-s`, for docs/quantization.md). Both
engines are built from the same checkpoint, float32 on the CPU, so the only difference is the cache (and,
for the combined row, the weights' scheme too, against the unquantized engine). The KV scales are
calibrated on CALIB_SAMPLES samples of 512 tokens of the default set (pydoc_data.topics).

Thresholds are what was measured on the 2-core CPU machine (2026-12-05) with a margin, stated here and in
docs/quantization.md. The tiny model's random weights make its logits chaotic, so its gate is loose; it
catches a scale that is not applied or applied twice (near-zero agreement), not a fine drift.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from accuracy_gates import check_gate, zen_of_python

from kiln.bench.accuracy import text_logits
from kiln.build import build_engine, build_tiny_engine
from kiln.engine_dir import EngineManifest
from kiln.models.tokenizer import Tokenizer

# weight quantization (None: unquantized) -> (least top-1 agreement, most mean KL in nats) of the engine
# with an fp8 KV cache against the unquantized engine with a float32 cache.
TINY_GATES = {None: (0.58, 1.25)}  # measured 0.636, 0.973
SMOLLM2_GATES = {
    None: (0.82, 0.14),  # measured 0.877, 0.098
    "fp8": (0.68, 0.46),  # measured 0.744, 0.351 (fp8 weights alone: 0.739, 0.350)
}
CALIB_SAMPLES = 4


def test_tiny_engine_with_an_fp8_kv_cache_tracks_the_16_bit_one(tmp_path: Path) -> None:
    reference_dir, fp8_dir = tmp_path / "float32", tmp_path / "fp8-kv"
    build_tiny_engine(reference_dir)
    build_tiny_engine(fp8_dir, kv_cache_dtype="fp8", calib_size=CALIB_SAMPLES)
    assert EngineManifest.load(fp8_dir).kv_cache_dtype == "fp8"
    ids = Tokenizer(reference_dir).encode(zen_of_python())
    check_gate(
        "tiny fp8 KV", text_logits(reference_dir, ids), text_logits(fp8_dir, ids), ids, TINY_GATES[None]
    )


@pytest.mark.slow
@pytest.mark.parametrize("quantization", list(SMOLLM2_GATES))
def test_smollm2_with_an_fp8_kv_cache_tracks_the_16_bit_one(
    smollm2_gguf: Path, smollm2_reference, tmp_path: Path, quantization: str | None
) -> None:
    ids, reference = smollm2_reference
    engine = tmp_path / "engine"
    build_engine(
        smollm2_gguf,
        engine,
        dtype="float32",
        quantization=quantization,
        kv_cache_dtype="fp8",
        calib_size=CALIB_SAMPLES,
        progress=False,
    )
    check_gate(
        f"SmolLM2 fp8 KV, weights {quantization or 'unquantized'}",
        reference,
        text_logits(engine, ids),
        ids,
        SMOLLM2_GATES[quantization],
    )
