"""GGUF -> native engine on the real SmolLM2-135M-Instruct Q4_1 file, checked against transformers' loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.build import EngineManifest, build_engine
from kiln.errors import CheckpointError

# Tests on the real file are `slow`: dequantizing 135M Q4_1 parameters twice takes ~40 s on 2 cores.


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "engine"
    build_engine(smollm2_gguf, out, dtype="float32", progress=False)
    return out


@pytest.mark.slow
def test_engine_is_valid_and_describes_smollm2(smollm2_engine: Path, smollm2_gguf: Path) -> None:
    manifest = EngineManifest.load(smollm2_engine, verify_checksums=True)
    model = manifest.model
    assert (model.vocab_size, model.hidden_size, model.num_hidden_layers) == (49152, 576, 30)
    assert (model.num_attention_heads, model.num_key_value_heads, model.head_dim) == (9, 3, 64)
    assert model.tie_word_embeddings and model.rope_theta == 100000.0 and model.rope_scaling is None
    assert (model.bos_token_id, model.eos_token_ids) == (1, [2])
    assert manifest.quantization is None  # dequantized: the engine stores plain float32
    assert manifest.extra == {"gguf_file_type": "MOSTLY_Q4_1"}
    assert manifest.source == str(smollm2_gguf)
    assert manifest.served_model_name == "SmolLM2-135M-Instruct.Q4_1"


@pytest.mark.slow
def test_packed_weights_equal_what_transformers_loads(smollm2_engine: Path, smollm2_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).state_dict()
    packed = load_file(str(smollm2_engine / "model.safetensors"))
    assert "lm_head.weight" not in packed  # tied
    assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    checked = 0
    for name, tensor in packed.items():
        for fused_name, parts in fused.items():
            if fused_name in name:
                want = torch.cat([reference[name.replace(fused_name, part)] for part in parts])
                break
        else:
            want = reference[name]
        assert torch.equal(tensor, want), name
        checked += 1
    assert checked == 2 + 30 * 6


@pytest.mark.slow
def test_tokenizer_and_chat_template_survive(smollm2_engine: Path, smollm2_gguf: Path) -> None:
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(smollm2_engine)
    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = "Hello, world! Ünïcödé 😀 def f(x):\n    return x"
    assert ours.encode(text) == reference.encode(text)
    assert ours.decode(ours.encode(text)) == text
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert ours.eos_token == "<|im_end|>" and ours.convert_tokens_to_ids("<|im_end|>") == 2


def test_non_llama_gguf_is_refused(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_context_length(8)
    writer.add_embedding_length(4)
    writer.add_head_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"model_type .gpt2. is not a Llama-family model"):
        build_engine(path, tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("data", [b"", b"GGUF", b"not a gguf file" * 4])
def test_unreadable_gguf_is_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="cannot read GGUF"):
        build_engine(path, tmp_path / "e", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
