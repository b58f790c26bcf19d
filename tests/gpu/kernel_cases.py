"""Shared pieces of the GPU kernel tests: the kernel device, error measure and random paged batches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from kiln.config import ModelConfig
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.models.rope import build_cos_sin_cache

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton 3.6's CPU interpreter truncates float32 -> bf16 (GPUs round to nearest) and miscomputes bf16
# tl.dot, so bf16 is checked on a real GPU only.
DTYPES = [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRET, reason="bf16 is checked on a GPU only")),
]


def kernel_device() -> torch.device | None:
    """CUDA when present; the CPU under Triton's interpreter; otherwise None (the tests skip)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if INTERPRET:
        return torch.device("cpu")
    return None


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere gives NaN, which fails every bound)."""
    out64, ref64 = out.double(), ref.double()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def quant_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many quantization steps apart a and b (int8 or e4m3 tensors of one dtype) are, element by element.
    e4m3: sign-magnitude bit patterns are monotonic in the magnitude, so the distance is that of their
    ordinals (+0 and -0 are both 0)."""
    assert a.dtype == b.dtype
    if a.dtype == torch.int8:
        return (a.to(torch.int32) - b.to(torch.int32)).abs()

    def ordinal(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.uint8).to(torch.int32)
        magnitude = bits & 0x7F
        return torch.where(bits >= 0x80, -magnitude, magnitude)

    return (ordinal(a) - ordinal(b)).abs()


def rope_table(head_dim: int, max_positions: int, device, rope_scaling: dict | None = None) -> torch.Tensor:
    """A Llama-3 RoPE cos/sin table (theta 500,000) for `head_dim`, `max_positions` rows on `device`."""
    config = ModelConfig(
        vocab_size=32,
        hidden_size=head_dim * 4,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=head_dim,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rope_scaling=rope_scaling,
    )
    return build_cos_sin_cache(config, max_positions, device=device)


@dataclass(slots=True)
class PagedBatch:
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D] the new tokens' keys (already stored in k_cache)
    value: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    meta: AttentionMetadata


def make_paged_batch(
    q_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    num_padding_tokens: int = 0,
) -> PagedBatch:
    """A ragged batch whose requests own shuffled, non-contiguous cache blocks filled with random K/V.

    Request i has context_lens[i] cached tokens and q_lens[i] new ones (seq_len = their sum); the
    new tokens' K/V are written into the cache too, as the model does before attention. Block 0
    is never owned (block tables are padded with 0, so reading it by mistake shows up as an error),
    and `num_padding_tokens` rows with slot -1 are appended to the query.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, q_lens, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    slots: list[int] = []
    used = 0
    for i, n in enumerate(blocks_per_seq):
        own = order[used : used + n]
        used += n
        tables[i, :n] = torch.tensor(own, dtype=torch.int32)
        for pos in range(context_lens[i], seq_lens[i]):
            slots.append(own[pos // block_size] * block_size + pos % block_size)
    slots += [-1] * num_padding_tokens
    num_tokens = len(slots)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    query = randn(num_tokens, num_heads, head_dim)
    key = randn(num_tokens, num_kv_heads, head_dim)
    value = randn(num_tokens, num_kv_heads, head_dim)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    real = slot_mapping >= 0
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping[real]] = key[real]
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping[real]] = value[real]
    meta = AttentionMetadata.for_batch(q_lens, seq_lens, tables.to(device), block_size, slot_mapping)
    return PagedBatch(query, key, value, k_cache, v_cache, meta)


def long_context(n: int) -> int:
    """n tokens of context, at most 300 under Triton's interpreter (which is slow)."""
    return min(n, 300) if INTERPRET else n


def store_case(head_dim, num_kv_heads, block_size, dtype, device):
    """The store tests' ragged batch: 7 new tokens after 3, 1 after 40, 20 from empty, 3 padding tokens."""
    return make_paged_batch(
        [7, 1, 20],
        [3, 40, 0],
        num_kv_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        device,
        num_padding_tokens=3,
    )


def rotary_case(head_dim, num_heads, num_kv_heads, block_size, dtype, device):
    """The rotary-store tests' ragged batch: three sequences (5 new tokens, 1 after 33, 12 after 4) and two
    padding tokens, their positions and a RoPE table -> (batch, positions, table)."""
    batch = make_paged_batch(
        [5, 1, 12],
        [0, 33, 4],
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        device,
        num_padding_tokens=2,
    )
    positions = torch.tensor([*range(5), 33, *range(4, 16), 0, 0], device=device)
    return batch, positions, rope_table(head_dim, 64, device)


def greedy_agreement(engine, engine_dir) -> tuple[int, int]:
    """Greedy decoding through `engine` (its CUDA graphs): one request alone, then four together, 16 tokens
    each; returns (tokens that are the CPU reference's argmax given the same prefix, tokens generated)."""
    from kiln.bench.accuracy import text_logits
    from kiln.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(7)
    batches = [[torch.randint(3, 500, (9,), generator=gen).tolist()]]
    batches.append([torch.randint(3, 500, (n,), generator=gen).tolist() for n in (4, 21, 13, 30)])
    greedy = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    agree = total = 0
    for batch in batches:
        for i, prompt in enumerate(batch):
            engine.add_request(str(i), params=greedy, prompt_token_ids=prompt)
        tokens: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id].extend(out.outputs[0].token_ids)
        for i, prompt in enumerate(batch):
            generated = tokens[str(i)]
            ref = text_logits(engine_dir, prompt + generated)[len(prompt) - 1 : -1]
            agree += (ref.argmax(-1) == torch.tensor(generated)).sum().item()
            total += len(generated)
    return agree, total


def force_one_pass(monkeypatch: pytest.MonkeyPatch, one_pass: bool | None) -> None:
    """Make `triton_quant_act.quantize_rows` take one pass (rows up to its ONE_PASS_MAX) or two, or (None)
    its own measured choice."""
    from kiln.kernels import triton_quant_act as qa

    if one_pass is not None:
        monkeypatch.setattr(qa, "one_pass_pays", lambda k: one_pass and k <= qa.ONE_PASS_MAX)


def record_launch_keys(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[tuple]:
    """Replace `module.name`, a Triton kernel, by a recorder of each launch's specialisation key (what
    Triton builds a variant per) as the launcher's own binder computes it for sm_90; nothing runs, so
    no GPU is needed, only Triton."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = getattr(module, name)
    binder = create_function_from_signature(
        kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32))
    )
    keys: list[tuple] = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                _, specialization, options = binder(*args, **kwargs)
                keys.append((tuple(map(str, specialization)), str(options)))

            return launch

    monkeypatch.setattr(module, name, Recorder())
    return keys
