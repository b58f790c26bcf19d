"""Fixtures shared by the model-level accuracy tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accuracy_gates import zen_of_python

from kiln.bench.accuracy import text_logits
from kiln.models.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path) -> tuple[list[int], torch.Tensor]:
    """The gates' text as SmolLM2 token ids, and the unquantized float32 engine's logits over it (the
    engine built once into ~/.cache/kiln from the same GGUF)."""
    from kiln.build.default_model import ensure_default_engine

    engine = ensure_default_engine(dtype="float32")
    ids = Tokenizer(engine).encode(zen_of_python())
    return ids, text_logits(engine, ids)
