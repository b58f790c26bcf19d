"""Kiln's Llama over the paged KV cache vs Hugging Face transformers on the same tiny random weights.

Covers ragged batched prefill (with padding tokens), chunked prefill through a shuffled block table,
a batched greedy decode loop vs `generate`, scaled RoPE, and the packing / strict-loading rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.build.tiny import write_tiny_checkpoint
from kiln.config import ModelConfig
from kiln.errors import CheckpointError
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM
from kiln.models.loader import load_model
from kiln.models.weights import expected_packed_shapes, pack_hf_state_dict

ATOL = RTOL = 1e-4


@dataclass(slots=True)
class Seq:
    """One request as the test's mini 'scheduler' sees it: its tokens so far and its blocks."""

    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0


class PagedRunner:
    """Builds AttentionMetadata by hand and runs Kiln's model step by step over a paged cache."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, seed: int = 0) -> None:
        cfg = model.config
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.model, self.block_size = model, block_size
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
        # Hand blocks out in a shuffled order so block tables are never contiguous.
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()

    def step(self, seqs: list[Seq], num_new: list[int], num_padding: int = 0) -> torch.Tensor:
        """Compute num_new[i] more tokens of each seq; returns logits [sum(num_new), V] of those tokens."""
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        for seq, n in zip(seqs, num_new, strict=True):
            end = seq.num_computed + n
            while len(seq.blocks) * self.block_size < end:
                seq.blocks.append(self.free_blocks.pop())
            for pos in range(seq.num_computed, end):
                ids.append(seq.tokens[pos])
                positions.append(pos)
                slots.append(seq.blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            seq.num_computed = end
            starts.append(starts[-1] + n)
            seq_lens.append(end)
        ids += [0] * num_padding
        positions += [0] * num_padding
        slots += [-1] * num_padding  # CUDA-graph padding: neither stored nor attended
        width = max(len(s.blocks) for s in seqs)
        tables = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            max_query_len=max(num_new),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            block_size=self.block_size,
        )
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)
            return self.model.compute_logits(hidden[: starts[-1]])


def _hf_model(path: Path):
    from transformers import LlamaForCausalLM as HFLlama

    model = HFLlama.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # decode the full length, as the Kiln loop does
    model.generation_config.pad_token_id = 0
    return model


def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _prompt(length: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["tiny_gqa_dir", "tiny_mha_dir"])
def pair(request: pytest.FixtureRequest) -> tuple[LlamaForCausalLM, object]:
    path = request.getfixturevalue(request.param)
    model, _ = load_model(path)
    return model, _hf_model(path)


def test_ragged_batch_prefill_matches_hf(pair) -> None:
    model, hf = pair
    vocab = model.config.vocab_size
    prompts = [_prompt(n, vocab, seed=n) for n in (7, 13, 2)]
    runner = PagedRunner(model, num_blocks=16, block_size=4)
    logits = runner.step([Seq(p) for p in prompts], [len(p) for p in prompts], num_padding=3)
    expected = torch.cat([_hf_logits(hf, p) for p in prompts])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_chunked_prefill_through_shuffled_blocks_matches_hf(pair) -> None:
    model, hf = pair
    prompt = _prompt(11, model.config.vocab_size, seed=5)
    runner = PagedRunner(model, num_blocks=12, block_size=4, seed=3)
    seq = Seq(prompt)
    chunk_logits = [runner.step([seq], [n]) for n in (4, 3, 4)]
    assert seq.blocks != sorted(seq.blocks), "the test means to exercise a non-contiguous block table"
    expected = _hf_logits(hf, prompt)
    torch.testing.assert_close(chunk_logits[-1][-1], expected[-1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat(chunk_logits), expected, atol=ATOL, rtol=RTOL)


def test_batched_greedy_decode_equals_hf_generate(pair) -> None:
    model, hf = pair
    vocab, steps = model.config.vocab_size, 12
    seqs = [Seq(_prompt(n, vocab, seed=10 + n)) for n in (6, 3)]
    prompts = [list(s.tokens) for s in seqs]
    runner = PagedRunner(model, num_blocks=16, block_size=4, seed=1)
    logits = runner.step(seqs, [len(p) for p in prompts])
    last_rows = torch.tensor([len(prompts[0]) - 1, len(prompts[0]) + len(prompts[1]) - 1])
    next_tokens = logits[last_rows].argmax(-1).tolist()
    for _ in range(steps - 1):
        for seq, token in zip(seqs, next_tokens, strict=True):
            seq.tokens.append(token)
        next_tokens = runner.step(seqs, [1, 1]).argmax(-1).tolist()
    for seq, token in zip(seqs, next_tokens, strict=True):
        seq.tokens.append(token)
    for seq, prompt in zip(seqs, prompts, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)
        assert out[0].tolist() == seq.tokens
        assert len(seq.tokens) == len(prompt) + steps


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that with head_dim 16 some frequencies are kept, some blended and some scaled.
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("scaling", [LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0}])
def test_scaled_rope_matches_hf(tmp_path: Path, scaling: dict) -> None:
    path = write_tiny_checkpoint(tmp_path, seed=2, rope_scaling=scaling)
    model, config = load_model(path)
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == scaling["rope_type"]
    hf = _hf_model(path)
    prompt = _prompt(70, config.vocab_size, seed=7)  # past original_max_position_embeddings
    runner = PagedRunner(model, num_blocks=24, block_size=4)
    seq = Seq(prompt)
    logits = torch.cat([runner.step([seq], [n]) for n in (50, 20)])
    torch.testing.assert_close(logits, _hf_logits(hf, prompt), atol=ATOL, rtol=RTOL)


# -- packing and strict loading ---------------------------------------------------------------------


def _hf_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _config(path: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


def test_packing_fuses_rows_in_order_and_streams(tiny_gqa_dir: Path) -> None:
    state, config = _hf_state(tiny_gqa_dir), _config(tiny_gqa_dir)
    names = list(state)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry it
    packed = dict(pack_hf_state_dict(reversed(list(state.items())), config))
    assert {k: tuple(v.shape) for k, v in packed.items()} == expected_packed_shapes(config)
    layer = "model.layers.1."
    qkv = packed[layer + "self_attn.qkv_proj.weight"]
    q, k, v = qkv.split([config.q_size, config.kv_size, config.kv_size])
    assert torch.equal(q, state[layer + "self_attn.q_proj.weight"])
    assert torch.equal(k, state[layer + "self_attn.k_proj.weight"])
    assert torch.equal(v, state[layer + "self_attn.v_proj.weight"])
    gate, up = packed[layer + "mlp.gate_up_proj.weight"].chunk(2)
    assert torch.equal(gate, state[layer + "mlp.gate_proj.weight"])
    assert torch.equal(up, state[layer + "mlp.up_proj.weight"])
    # Streaming: a layer's fused tensors come out before the next layer's inputs are read.
    consumed: list[str] = []

    def source():
        for name in names:
            consumed.append(name)
            yield name, state[name]

    for name, _ in pack_hf_state_dict(source(), config):
        if name == "model.layers.0.self_attn.qkv_proj.weight":
            assert not any(n.startswith("model.layers.1.") for n in consumed)


def test_packing_drops_tied_head_and_rejects_bad_input(tiny_mha_dir: Path) -> None:
    state, config = _hf_state(tiny_mha_dir), _config(tiny_mha_dir)
    assert config.tie_word_embeddings
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # some tied checkpoints store it anyway
    assert "lm_head.weight" not in dict(pack_hf_state_dict(state, config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        dict(pack_hf_state_dict({**state, "model.layers.0.mlp.extra.weight": torch.ones(1)}, config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\."):
        dict(pack_hf_state_dict({**state, "model.layers.9.mlp.down_proj.weight": torch.ones(1)}, config))
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        dict(pack_hf_state_dict(state, config))
    with pytest.raises(CheckpointError, match="twice"):
        dict(pack_hf_state_dict([("model.norm.weight", torch.ones(1))] * 2, config))


def test_load_weights_is_strict(tiny_gqa_dir: Path) -> None:
    config = _config(tiny_gqa_dir)
    packed = dict(pack_hf_state_dict(_hf_state(tiny_gqa_dir), config))
    model = LlamaForCausalLM(config)
    missing = {k: v for k, v in packed.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.down_proj\.weight"):
        model.load_weights(missing)
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_proj\.weight"):
        model.load_weights({**packed, "model.layers.0.self_attn.q_proj.weight": torch.ones(1)})
    bad = {**packed, "model.norm.weight": torch.ones(config.hidden_size + 1)}
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape"):
        model.load_weights(bad)
    model.load_weights(packed)
    assert torch.equal(
        model.model.layers[1].self_attn.qkv_proj.weight, packed["model.layers.1.self_attn.qkv_proj.weight"]
    )


def test_load_model_reads_shards_in_a_chosen_dtype(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    state = _hf_state(tiny_gqa_dir)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: state[n] for n in shard_names}, str(tmp_path / file))
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((tiny_gqa_dir / "config.json").read_text())
    # A stray file the index does not name must be ignored (Mistral repos ship consolidated.safetensors).
    save_file({"junk": torch.ones(1)}, str(tmp_path / "consolidated.safetensors"))

    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert model.cos_sin_cache.dtype == torch.float32 and not model.cos_sin_cache.is_meta
    reference, _ = load_model(tiny_gqa_dir)
    assert torch.equal(
        model.model.embed_tokens.weight, reference.model.embed_tokens.weight.to(torch.bfloat16)
    )
    prompt = _prompt(9, reference.config.vocab_size, seed=4)
    low = PagedRunner(model, num_blocks=4, block_size=4)
    high = PagedRunner(reference, num_blocks=4, block_size=4)
    low_kv = low.kv_caches
    low.kv_caches = [(k.bfloat16(), v.bfloat16()) for k, v in low_kv]
    got, want = low.step([Seq(prompt)], [9]), high.step([Seq(prompt)], [9])
    # bf16 runs the same model: the greedy choice agrees wherever fp32 is not near a tie.
    margin = want.topk(2).values.diff(dim=-1).abs().squeeze(-1)
    confident = margin > 0.5
    assert confident.any()
    assert torch.equal(got.argmax(-1)[confident], want.argmax(-1)[confident])


def test_engine_directory_loads_the_same_model(tiny_gqa_dir: Path, tmp_path: Path) -> None:
    from kiln.build.native import build_engine

    engine_dir = tmp_path / "engine"
    build_engine(tiny_gqa_dir, engine_dir, dtype="float32", progress=False)
    from_engine, config = load_model(engine_dir)
    from_hf, _ = load_model(tiny_gqa_dir)
    # The build also merges generation_config.json's eos ids into the config; the rest is the same.
    engine_fields, hf_fields = config.to_dict(), from_hf.config.to_dict()
    engine_fields.pop("eos_token_ids"), hf_fields.pop("eos_token_ids")
    assert engine_fields == hf_fields
    engine_params = dict(from_engine.named_parameters())
    for name, param in from_hf.named_parameters():
        assert torch.equal(engine_params[name], param), name
