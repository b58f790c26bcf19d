"""kiln.kernels.long_prompts on the CPU: which requests go to cuDNN, the buckets, and the gathering and
padding around SDPA against the reference attention (the GPU test runs the cuDNN side)."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import long_prompts, reference
from kiln.kernels.attention_metadata import AttentionMetadata


def _batch(q_lens, contexts, num_heads, num_kv_heads, head_dim, dtype, block_size=16, seed=0):
    """A ragged step whose requests own shuffled cache blocks; every slot no request owns is NaN."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(contexts, q_lens, strict=True)]
    blocks = [-(-s // block_size) for s in seq_lens]
    order = (torch.randperm(sum(blocks) + 2, generator=gen) + 1).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    slots, used = [], 0
    for i, n in enumerate(blocks):
        own = order[used : used + n]
        used += n
        tables[i, :n] = torch.tensor(own, dtype=torch.int32)
        for pos in range(seq_lens[i]):
            slots.append(own[pos // block_size] * block_size + pos % block_size)
    shape = (len(order) + 1, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    keys = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    values = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    reference.store_kv(keys, values, k_cache, v_cache, torch.tensor(slots))
    meta = AttentionMetadata.for_batch(q_lens, seq_lens, tables, block_size)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    return query, k_cache, v_cache, meta


def test_the_rule_takes_fresh_prompts_of_at_least_8192_tokens():
    assert long_prompts.LONG_PROMPT_TOKENS == 8192
    assert long_prompts.is_offloaded(8192, 8192)
    assert long_prompts.is_offloaded(30000, 30000)
    assert not long_prompts.is_offloaded(8191, 8191)  # too short
    assert not long_prompts.is_offloaded(9000, 9001)  # a chunk after a cached prefix
    assert not long_prompts.is_offloaded(1, 20000)  # a decode


def test_offloaded_requests_are_picked_from_the_host_lists():
    starts = [0, 1, 8193, 17193, 17693, 17694, 27694]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0),
        query_start_loc=torch.zeros(0),
        seq_lens=torch.zeros(0),
        block_tables=torch.zeros(0),
        max_query_len=10000,
        max_seq_len=20000,
        query_start_loc_cpu=starts,
        # a decode, a fresh 8192, a 9000 chunk after 100 cached, a 500 prompt, a decode, a fresh 10000
        seq_lens_cpu=[20000, 8192, 9100, 500, 17, 10000],
        block_size=16,
    )
    assert long_prompts.offloaded_requests(meta) == [1, 5]


@pytest.mark.parametrize(
    ("length", "padded"),
    [
        (1000, 1024),
        (8192, 8192),
        (8193, 8448),
        (16385, 16896),
        (20000, 20480),
        (32768, 32768),
        (100000, 100352),
    ],
)
def test_buckets(length, padded):
    assert long_prompts.bucket(length) == padded


def test_an_offloaded_prompt_grows_by_under_a_32nd_and_an_octave_has_32_buckets():
    for octave in (13, 14, 15, 16):
        lengths = range((1 << octave) + 1, (1 << (octave + 1)) + 1)
        assert len({long_prompts.bucket(n) for n in lengths}) == 32
        assert all(0 <= long_prompts.bucket(n) - n < n / 32 for n in lengths)


@pytest.mark.parametrize(
    ("capability", "cudnn", "version", "offloads"),
    [
        ((9, 0), True, "2.11.0+cu130", True),
        ((9, 0), True, "2.13.0", True),
        ((9, 0), True, "2.10.0+cu128", False),  # older than the torch measured and tested
        ((9, 0), False, "2.11.0", False),  # no cuDNN
        ((8, 0), True, "2.11.0", False),  # not Hopper: not measured
        ((10, 0), True, "2.11.0", False),
    ],
)
def test_which_gpus_offload(monkeypatch, capability, cudnn, version, offloads):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: cudnn)
    monkeypatch.setattr(torch, "__version__", version)
    assert long_prompts._offloading_gpu.__wrapped__(0) == offloads  # uncached: the rule itself


def test_a_cpu_tensor_is_never_offloaded():
    query = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    assert not long_prompts.device_offloads(query, torch.zeros(1, 16, 2, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 64), (4, 4, 32)])
def test_a_fresh_prompt_matches_the_reference_whatever_the_stale_slots_hold(
    dtype, num_heads, num_kv_heads, head_dim
):
    # 1030 tokens: neither a bucket (1280) nor a whole number of blocks, between a decode and a chunk.
    query, k_cache, v_cache, meta = _batch(
        [1, 1030, 40], [300, 0, 70], num_heads, num_kv_heads, head_dim, dtype
    )
    scale = head_dim**-0.5
    expected = reference.paged_attention(query, k_cache, v_cache, meta, scale)
    out = torch.full_like(query, 7.0)
    long_prompts.attend_fresh_prompt(query, k_cache, v_cache, meta, scale, 1, out)
    rows = slice(1, 1031)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[rows].float(), expected[rows].float(), atol=tolerance, rtol=tolerance)
    assert (out[0] == 7.0).all() and (out[1031:] == 7.0).all()  # other requests' rows are not touched


def test_a_request_with_a_cached_context_is_refused():
    query, k_cache, v_cache, meta = _batch([1100], [20], 2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="cached context"):
        long_prompts.attend_fresh_prompt(query, k_cache, v_cache, meta, 1.0, 0, torch.empty_like(query))
