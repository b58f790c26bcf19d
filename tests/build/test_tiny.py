"""The tiny random checkpoint: deterministic, loadable by transformers, exact tokenizer round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.build.tiny import CHAT_EOS_TOKEN_ID, MIN_VOCAB_SIZE, write_tiny_checkpoint

FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_gqa_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gqa_dir)


def test_same_seed_gives_identical_files(tmp_path: Path, tiny_gqa_dir: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "again", seed=0, num_key_value_heads=2)
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_gqa_dir / name).read_bytes(), name


def test_other_seed_changes_weights_only(tmp_path: Path, tiny_gqa_dir: Path) -> None:
    other = write_tiny_checkpoint(tmp_path / "other", seed=7)
    assert (other / "model.safetensors").read_bytes() != (tiny_gqa_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_gqa_dir / "tokenizer.json").read_bytes()


def test_caller_rng_is_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_checkpoint(tmp_path, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_config_describes_the_requested_model(tiny_gqa_dir: Path, tiny_mha_dir: Path) -> None:
    from kiln.config import ModelConfig

    gqa = ModelConfig.from_hf(json.loads((tiny_gqa_dir / "config.json").read_text()))
    assert (gqa.num_attention_heads, gqa.num_key_value_heads, gqa.head_dim) == (4, 2, 16)
    assert (gqa.vocab_size, gqa.hidden_size, gqa.num_hidden_layers) == (512, 64, 2)
    assert not gqa.tie_word_embeddings
    mha = ModelConfig.from_hf(json.loads((tiny_mha_dir / "config.json").read_text()))
    assert mha.num_key_value_heads == 4 and mha.tie_word_embeddings
    generation = json.loads((tiny_gqa_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, CHAT_EOS_TOKEN_ID]


def test_tied_checkpoint_has_no_lm_head(tiny_gqa_dir: Path, tiny_mha_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_mha_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    with safe_open(str(tiny_gqa_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()  # noqa: SIM118
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32


def test_rope_scaling_reaches_the_config(tmp_path: Path) -> None:
    from kiln.config import ModelConfig

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    out = write_tiny_checkpoint(tmp_path, rope_scaling=scaling)
    config = ModelConfig.from_hf(json.loads((out / "config.json").read_text()))
    assert config.rope_scaling == scaling


def test_vocab_size_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f">= {MIN_VOCAB_SIZE}"):
        write_tiny_checkpoint(tmp_path / "small", vocab_size=100)
    with pytest.raises(ValueError, match="more than the tiny corpus can train"):
        write_tiny_checkpoint(tmp_path / "huge", vocab_size=100_000)


def test_transformers_loads_it_and_logits_are_peaky(tiny_gqa_dir: Path, tiny_mha_dir: Path) -> None:
    """Greedy parity tests need a clear winner at almost every position."""
    from transformers import AutoModelForCausalLM

    for directory in (tiny_gqa_dir, tiny_mha_dir):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        ids = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits
        top2 = logits.topk(2, dim=-1).values
        gap = top2[..., 0] - top2[..., 1]
        assert gap.median() > 0.8
        assert (gap < 1e-3).float().mean() < 0.01


def test_tokenizer_specials_and_chat_template(tokenizer) -> None:
    assert len(tokenizer) == 512
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token_id == CHAT_EOS_TOKEN_ID
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)  # no bos added
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode("<|im_end|>") == [2]


def test_tokenizer_learned_multibyte_merges(tokenizer) -> None:
    # Merges for multi-byte characters: fewer tokens than UTF-8 bytes.
    for text in ("今天天气很好", "Привет", "😀"):
        assert len(tokenizer.encode(text)) < len(text.encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_any_utf8_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < 512 for i in ids)
    assert tokenizer.decode(ids) == text
