"""Triton paged attention against the PyTorch reference: decode (split and unsplit), prefill,
chunked prefill over cached prefixes, mixed batches, GQA, block sizes, fp16 and bf16."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, long_context, make_paged_batch, rel_error

from kiln.kernels import reference

pytestmark = pytest.mark.gpu

# Relative Frobenius error bounds: the kernel rounds probabilities to the input dtype before P @ V.
BOUNDS = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
HEAD_SHAPES = [(64, 1), (64, 4), (64, 8), (128, 1), (128, 4), (128, 8)]  # (head_dim, query heads per KV head)


def _triton_attention():
    from kiln.kernels import triton_attention

    return triton_attention


def _check(batch, dtype, num_splits=None):
    head_dim = batch.query.shape[-1]
    scale = head_dim**-0.5
    out = _triton_attention().paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.meta, scale, num_splits=num_splits
    )
    ref = reference.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, scale)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    err = rel_error(out, ref)
    assert err < BOUNDS[dtype], f"relative error {err:.2e}"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("head_dim", "group"), HEAD_SHAPES)
def test_decode_long_contexts(device, head_dim, group, block_size, dtype):
    num_kv_heads = 2 if group == 8 else 4
    contexts = [long_context(4100), 0, 37, long_context(1999), 16, long_context(777)]
    batch = make_paged_batch(
        [1] * len(contexts), contexts, num_kv_heads * group, num_kv_heads, head_dim, block_size, dtype, device
    )
    _check(batch, dtype)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_one_every_split_count(device, num_splits, dtype):
    # Batch 1 is where the split pays; every count must give the same answer as no split.
    batch = make_paged_batch([1], [long_context(6000)], 32, 8, 128, 16, dtype, device, seed=1)
    _check(batch, dtype, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("head_dim", "group"), HEAD_SHAPES)
def test_prefill_chunks_and_decodes_mixed(device, head_dim, group, block_size, dtype):
    # Full prefills, chunks after a cached prefix (aligned and not), and decodes in one ragged step.
    q_lens = [37, 64, 5, 1, 130, 1]
    contexts = [0, 96, 40, long_context(1500), 17, 0]
    num_kv_heads = 2
    batch = make_paged_batch(
        q_lens, contexts, num_kv_heads * group, num_kv_heads, head_dim, block_size, dtype, device, seed=2
    )
    _check(batch, dtype)


# Mixed steps whose first requests decode (the scheduler's usual order: running requests, then the prompts
# it admits): from MIN_SPLIT_DECODES of them on, those take a launch of decode tiles and the rest prefill
# tiles. The small batches here lower the bound (`split_early`) to take that path.
DECODES_FIRST = ([1, 1, 1, 37, 64, 1, 130], [long_context(1500), 16, 300, 0, 96, 40, 17])


@pytest.fixture
def split_early(monkeypatch):
    from kiln.kernels import attention_plan

    monkeypatch.setattr(attention_plan, "MIN_SPLIT_DECODES", 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("head_dim", "group"), HEAD_SHAPES)
def test_leading_decodes_then_prompts(device, split_early, head_dim, group, block_size, dtype):
    q_lens, contexts = DECODES_FIRST
    batch = make_paged_batch(q_lens, contexts, 2 * group, 2, head_dim, block_size, dtype, device, seed=4)
    _check(batch, dtype)


def _record_launches(monkeypatch, run: bool) -> list:
    from kiln.kernels import triton_attention

    launched = []
    real = triton_attention._launch
    monkeypatch.setattr(
        triton_attention,
        "_launch",
        lambda *a, **k: launched.append(tuple(a[5:8])) or (real(*a, **k) if run else None),
    )
    return launched


def test_leading_decodes_take_a_launch_of_their_own(device, split_early, monkeypatch):
    """The launches a mixed step makes: leading decodes alone in decode tiles, then the rest (the decode
    after the prompts among them) from their first token, the whole batch's padding rows zero; a forced
    split count or tile keeps one launch, as does a step with fewer leading decodes than the bound."""
    from kiln.kernels import attention_plan

    q_lens, contexts = DECODES_FIRST
    batch = make_paged_batch(
        q_lens, contexts, 8, 2, 64, 16, torch.float16, device, seed=5, num_padding_tokens=3
    )
    launched = _record_launches(monkeypatch, run=True)
    out = _check(batch, torch.float16)
    assert launched == [(0, 3, True), (3, 7, False)]
    assert not out[-3:].any()

    launched.clear()
    _check(batch, torch.float16, num_splits=1)
    assert launched == [(0, 7, False)]
    launched.clear()
    monkeypatch.setattr(attention_plan, "MIN_SPLIT_DECODES", 4)
    _check(batch, torch.float16)
    assert launched == [(0, 7, False)]


@pytest.mark.parametrize("cache", ["float16", "fp8"])
def test_the_bounds_on_leading_decodes(device, monkeypatch, cache):
    """At the built-in bounds (attention_plan.split_leading_decodes): MIN_SPLIT_DECODES leading decodes
    split the step and one fewer does not; over an fp8 cache MIN_SPLIT_LONG_FP8_DECODES do where their
    mean context reaches LONG_FP8_DECODE_KEYS, which a 16-bit cache does not look at."""
    from kiln.kernels import attention_plan as plan
    from kiln.kernels import triton_attention

    fp8 = cache == "fp8"
    launched = _record_launches(monkeypatch, run=False)
    few, long = plan.MIN_SPLIT_LONG_FP8_DECODES, plan.LONG_FP8_DECODE_KEYS
    cases = [
        (plan.MIN_SPLIT_DECODES, 5, True),
        (plan.MIN_SPLIT_DECODES - 1, 5, False),
        (few, long, fp8),
        (few, long - 1, False),
        (few - 1, 2 * long, False),
    ]
    for decodes, context, split in cases:
        batch = make_paged_batch(
            [1] * decodes + [20], [context - 1] * decodes + [0], 4, 1, 16, 16, torch.float16, device
        )
        scales = {}
        k_cache, v_cache = batch.k_cache, batch.v_cache
        if fp8:
            k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
            scales = {"k_scale": torch.ones(1, device=device), "v_scale": torch.ones(1, device=device)}
        launched.clear()
        triton_attention.paged_attention(batch.query, k_cache, v_cache, batch.meta, 0.25, **scales)
        assert len(launched) == (2 if split else 1), (decodes, context)


def test_a_split_prefill_part_from_a_later_tile(device, split_early):
    """The prompts' launch starts at tile first_token // BLOCK_Q, not 0, and with few programs splits the
    sequence: its split counters are indexed from that tile, and must end at zero for the next launch."""
    from kiln.kernels.attention_plan import split_counters

    batch = make_paged_batch([1] * 40 + [70], [20] * 40 + [long_context(2000)], 4, 1, 64, 16, torch.float16,
                             device, seed=6)  # fmt: skip
    first = _check(batch, torch.float16)
    assert torch.equal(_check(batch, torch.float16), first)
    assert not split_counters(device, 1).any()


@pytest.mark.parametrize(("head_dim", "group"), [(64, 4), (128, 8)])
def test_block_size_one(device, head_dim, group):
    batch = make_paged_batch([9, 1, 1], [3, 50, 0], 2 * group, 2, head_dim, 1, torch.float16, device, seed=3)
    _check(batch, torch.float16)


def test_split_merge_leaves_its_counters_at_zero_and_repeats_exactly(device):
    # The last split of each tile merges and resets the tile's counter: a second launch (a CUDA-graph
    # replay is the same) must find every counter at zero and give the same output bit for bit.
    from kiln.kernels import attention_plan

    batch = make_paged_batch(
        [1, 1, 5], [long_context(900), 40, long_context(300)], 16, 4, 64, 16, torch.float16, device
    )
    first = _check(batch, torch.float16, num_splits=8)
    counters = attention_plan._COUNTERS[batch.query.device]
    assert int(counters.count_nonzero()) == 0
    second = _check(batch, torch.float16, num_splits=8)
    assert torch.equal(first, second)
    assert int(counters.count_nonzero()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_prefill_split(device, dtype):
    # A long chunk attending to a long prefix, forced through the split path too.
    batch = make_paged_batch([long_context(700)], [long_context(2000)], 8, 2, 128, 16, dtype, device, seed=4)
    unsplit = _check(batch, dtype, num_splits=1)
    split = _check(batch, dtype, num_splits=4)
    assert rel_error(split, unsplit) < BOUNDS[dtype]


def test_padding_rows_are_zero_and_caches_untouched(device):
    batch = make_paged_batch([3, 1], [5, 20], 8, 2, 64, 16, torch.float16, device, num_padding_tokens=4)
    k_before, v_before = batch.k_cache.clone(), batch.v_cache.clone()
    out = _check(batch, torch.float16)
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))
    assert torch.equal(batch.k_cache, k_before) and torch.equal(batch.v_cache, v_before)


def test_a_padded_decode_batch(device):
    # A decode step runs one program a token, request i's being tile i: the padding tokens' programs
    # have no request and leave their rows to the host's zeroing.
    batch = make_paged_batch(
        [1, 1, 1], [5, 20, 300], 8, 2, 64, 16, torch.float16, device, num_padding_tokens=5
    )
    out = _check(batch, torch.float16)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))


def test_odd_head_dim_and_group(device):
    # Not a Llama shape, but the masks must hold: head_dim 96 (padded to 128), 3 query heads per KV head.
    batch = make_paged_batch([4, 1], [10, 70], 6, 2, 96, 16, torch.float16, device, seed=5)
    _check(batch, torch.float16)


@pytest.mark.parametrize(
    ("block_m", "block_n", "num_warps", "num_stages", "keys_transposed"),
    [
        (128, 32, 8, 3, False),
        (32, 128, 4, 2, False),
        (64, 16, 2, 4, False),
        (128, 64, 4, 3, True),
        (16, 64, 4, 2, True),
    ],
)
def test_every_tuning_config_is_correct(device, block_m, block_n, num_warps, num_stages, keys_transposed):
    # The tuning sweep may pick any of these shapes, so each must compute the same function.
    from kiln.kernels.triton_attention import AttentionConfig

    config = AttentionConfig(block_m, block_n, num_warps, num_stages, keys_transposed)
    # A ragged head dim too (96, padded to 128), so the masked transposed-key load is exercised.
    head_dim = 96 if block_m == 16 else 128
    batch = make_paged_batch(
        [70, 1, 33], [50, long_context(900), 0], 32, 8, head_dim, 16, torch.float16, device, seed=6
    )
    out = _triton_attention().paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.meta, head_dim**-0.5, config=config
    )
    ref = reference.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, head_dim**-0.5)
    assert rel_error(out, ref) < BOUNDS[torch.float16]
