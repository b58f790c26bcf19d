"""Paged attention in Triton: one kernel for prefill, chunked prefill and decode, split along the sequence.

Rules (the same as `kiln.kernels.reference.paged_attention`):
- `query` is the ragged batch [T, num_heads, head_dim]; request i owns rows
  query_start_loc[i]:query_start_loc[i+1] and its new tokens sit at positions seq_lens[i]-q_len_i ..
  seq_lens[i]-1. Its keys and values (cached prefix and the new tokens, already stored) are read
  straight from the paged caches [num_blocks, block_size, num_kv_heads, head_dim] through its block
  table: nothing is gathered into contiguous memory.
- Causal: the query at position p attends to keys 0..p.
- Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads).
- An fp8 cache (float8_e4m3fn, with the layer's k_scale / v_scale): each K and V tile is converted to
  float16 (every e4m3 value is exact in it) before its tl.dot; k_scale is folded into the softmax scale
  and v_scale into the output (exact in math: softmax(q k^T s_k c) V s_v is the attention over the
  dequantized cache). The scales are read from device memory in the kernel, so a CUDA graph replays
  with their current values.
- An fp8 V tile is the second product's B operand, [keys, head dim] with the head dimension contiguous: the
  tensor cores want each thread's keys side by side, which a 16-bit tile gets from `ldmatrix.trans` and an
  8-bit one (no such form on sm_90) from byte-wise shared-memory loads, 64 a thread a 64-key tile
  (`benchmarks.kernel_sass`). Widening the tile first and laying it out in 16 bits removes those loads
  but was slower on an H200 (docs/results/2026-12-06-h200).
- A bfloat16 query over an fp8 cache runs its products in float16 too: widening e4m3 to bfloat16 costs
  a second conversion per element, and decode over long contexts is bound by those instructions, not
  by memory. The tile's query is divided by the power of two that brings its largest |q| under 2^15
  (exact; 1 for any ordinary query) and the softmax scale multiplied by it; the softmax weights round to
  float16, finer than bfloat16.

How the work is cut: a program owns one KV head and a tile of BLOCK_M rows, each row one (query
token, query head of that KV head's group) pair, so the group's heads share every K/V load. For
decode a tile is one token's whole group, and tile i is request i's. Otherwise tiles never straddle
requests and their owner is found by a binary search over `query_start_loc`. Either way the grid
depends only on tensor shapes (CUDA-graph safe).
Long contexts with few query tiles are split along the sequence into `num_splits` ranges, so a
batch-1 decode still fills the GPU. Each split writes its partial result (output and log-sum-exp)
and bumps a per-tile counter; the split that finds itself last merges them, in the same launch
(a separate merge kernel cost a launch per layer: 1.7 us of GPU time each in a 7B batch-1 step). The
counters live in a zeroed workspace that the merging program resets, so every launch, and every
CUDA-graph replay, finds them at zero.
Requests the dispatcher hands to cuDNN (`offloaded`, kiln.kernels.long_prompts) are skipped: their tiles
exit at once, by the same rule evaluated on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kiln.kernels import long_prompts
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.attention_plan import (
    builtin_config,
    choose_num_splits,
    decode_context_bounds,
    default_config,
    num_sms,
    split_counters,
    split_leading_decodes,
)
from kiln.kernels.pdl import pdl_enabled
from kiln.kernels.reference import check_kv_scales
from kiln.kernels.tiles import AttentionConfig

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The request owning global tile `tile`: request i's tiles start at query_start_loc[i] // BLOCK_Q + i."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_keys(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    start_n,
    hi,
    table_row,
    k_head,
    v_head,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    KEYS_TRANSPOSED: tl.constexpr,
):
    """One online-softmax step over keys start_n .. start_n+BLOCK_N-1, read through the block table.

    MASKED=False is for key tiles that lie wholly below `hi` and before every row's position.
    KEYS_TRANSPOSED loads the key tile as [HEAD_DIM, BLOCK_N] instead of transposing it in registers
    (a tuning choice: the same numbers either way).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    in_block = offs_n % BLOCK_SIZE
    n_valid = offs_n < hi
    if MASKED:
        block_id = tl.load(table_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    else:
        block_id = tl.load(table_row + offs_n // BLOCK_SIZE).to(tl.int64)
    key_rows = block_id * stride_kb + in_block * stride_ks
    v_ptrs = v_head + block_id[:, None] * stride_vb + in_block[:, None] * stride_vs + offs_d[None, :]
    kv_mask = n_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    # Unmasked loads when nothing can be out of range: they vectorise best.
    if KEYS_TRANSPOSED:
        k_t_ptrs = k_head + offs_d[:, None] + key_rows[None, :]
        if MASKED or HEAD_DIM != HEAD_DIM_P2:
            k_t_mask = (offs_d[:, None] < HEAD_DIM) & n_valid[None, :]
            k_t = tl.load(k_t_ptrs, mask=k_t_mask, other=0.0)
        else:
            k_t = tl.load(k_t_ptrs)
    else:
        k_ptrs = k_head + key_rows[:, None] + offs_d[None, :]
        if MASKED or HEAD_DIM != HEAD_DIM_P2:
            k_t = tl.trans(tl.load(k_ptrs, mask=kv_mask, other=0.0))
        else:
            k_t = tl.trans(tl.load(k_ptrs))
    s = tl.dot(q, k_t.to(q.dtype)) * scale_log2  # an fp8 tile widens exactly (a no-op for 16 bits)
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED or HEAD_DIM != HEAD_DIM_P2:  # noqa: SIM108 (a constexpr branch)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, l_i, m_new


# num_seqs and the block-table width change from step to step: specialising on them (Triton compiles a
# variant per value class, == 1 or a multiple of 16) had a serving engine compiling for seconds
# mid-load whenever a batch crossed into a new class.
@triton.jit(do_not_specialize=["num_seqs", "tile_base", "seq_base", "stride_bt"])
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    split_counters_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    k_scale_ptr,
    v_scale_ptr,
    num_seqs,
    tile_base,  # the first tile's number: a launch over a later part of the batch starts past 0
    seq_base,  # that part's first request: the metadata is read from there on
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DECODE: tl.constexpr,  # every request has one query token (a decode step)
    SKIP_LONG_PROMPTS: tl.constexpr,  # leave long fresh prompts to kiln.kernels.long_prompts
    LONG_PROMPT_TOKENS: tl.constexpr,
    KEYS_TRANSPOSED: tl.constexpr,
    KV_SCALED: tl.constexpr,  # an fp8 cache: k_scale / v_scale apply
    F16_DOTS: tl.constexpr,  # a bfloat16 query over an fp8 cache: the products in float16 (see the rules)
    LAUNCH_DEPENDENTS: tl.constexpr,  # PDL: the next kernel may start now (kiln.kernels.pdl)
):
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    # Last tiles first: under the causal mask they see the most keys, so starting them early
    # shortens the tail of the launch.
    tile = tile_base + tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Moved here rather than passed as views: a view's alignment would make a kernel variant of its own,
    # compiled the first time a mixed step splits there.
    query_start_loc_ptr += seq_base
    seq_lens_ptr += seq_base
    block_tables_ptr += seq_base.to(tl.int64) * stride_bt

    if DECODE:  # one token a request: tile i is request i's (the grid has a tile for each)
        seq = tile
        if seq >= num_seqs:
            return  # a padding token
    else:
        seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = 0 if DECODE else tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return  # a spare program: the grid is sized for the worst case
    kv_len = tl.load(seq_lens_ptr + seq)
    # kiln.kernels.long_prompts.is_offloaded: another kernel attends this request
    if SKIP_LONG_PROMPTS:  # noqa: SIM102 (a constexpr branch)
        if (q_len >= LONG_PROMPT_TOKENS) & (kv_len == q_len):
            return
    context_len = kv_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_tok = q_tile * BLOCK_Q + rows // GROUP_P2
    head_in_group = rows % GROUP_P2
    row_valid = (q_tok < q_len) & (head_in_group < GROUP) & (rows < BLOCK_Q * GROUP_P2)
    head = kv_head * GROUP + head_in_group
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_valid = offs_d < HEAD_DIM

    token = (q_start + q_tok).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    q_pos = context_len + q_tok  # absolute position of each row's query token

    # Keys this tile may see: up to its last query's position; this split covers one slice of them.
    last_tok = tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = context_len + last_tok + 1
    split_len = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_end)

    if KV_SCALED:  # k_scale folds into the softmax scale
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
    if F16_DOTS:  # a power of two brings the tile's largest |q| within float16's range; the scale undoes it
        q_max = tl.max(tl.max(tl.abs(q.to(tl.float32)), axis=1), axis=0)
        shift = tl.exp2(tl.maximum(tl.ceil(tl.log2(tl.maximum(q_max, 1.0) / 32768.0)), 0.0))
        q = (q.to(tl.float32) / shift).to(tl.float16)
        scale_log2 = scale_log2 * shift
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh

    # Keys every row of the tile may see come first, in whole tiles, without masks; the rest (the
    # causal diagonal and the ragged end) go through the masked path.
    first_pos = context_len + q_tile * BLOCK_Q
    unmasked_end = lo + tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0) // BLOCK_N * BLOCK_N
    for start_n in range(lo, unmasked_end, BLOCK_N):
        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q, q_pos, start_n, hi, table_row, k_head, v_head,
            stride_kb, stride_ks, stride_vb, stride_vs, scale_log2,
            HEAD_DIM, HEAD_DIM_P2, BLOCK_SIZE, BLOCK_N, False, KEYS_TRANSPOSED,
        )  # fmt: skip
    for start_n in range(unmasked_end, hi, BLOCK_N):
        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q, q_pos, start_n, hi, table_row, k_head, v_head,
            stride_kb, stride_ks, stride_vb, stride_vs, scale_log2,
            HEAD_DIM, HEAD_DIM_P2, BLOCK_SIZE, BLOCK_N, True, KEYS_TRANSPOSED,
        )  # fmt: skip

    if KV_SCALED:  # v_scale folds into the output (the splits' partials too: the merge is linear)
        acc = acc * tl.load(v_scale_ptr)
    store_mask = row_valid[:, None] & d_valid[None, :]
    out_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Partials are [T, num_heads, NUM_SPLITS, (HEAD_DIM_P2)] fp32; an empty split stores lse = -inf.
        rows_base = (token * NUM_HEADS + head) * NUM_SPLITS
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        tl.store(
            part_out_ptr + (rows_base + split)[:, None] * HEAD_DIM_P2 + offs_d[None, :],
            acc / safe_l[:, None],
            mask=store_mask,
        )
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + rows_base + split, lse, mask=row_valid)
        # Every thread's partial is written before the count says so (a barrier, then the counter's
        # release); the program that counts last sees all of them (acquire) and merges.
        tl.debug_barrier()
        counter = split_counters_ptr + tile * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            out = _merge_splits(part_out_ptr, part_lse_ptr, rows_base, offs_d, store_mask, row_valid,
                                HEAD_DIM_P2, NUM_SPLITS)  # fmt: skip
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _merge_splits(
    part_out_ptr,
    part_lse_ptr,
    rows_base,
    offs_d,
    store_mask,
    row_valid,
    HEAD_DIM_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """The splits' partial outputs weighted by their share of the softmax mass, rows [BLOCK_M, D].

    The loads bypass L1 (.cg): the partials were written by other programs of this launch."""
    lse_max = tl.full(rows_base.shape, float("-inf"), dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        lse = tl.load(part_lse_ptr + rows_base + s, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
        lse_max = tl.maximum(lse_max, lse)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # rows that are not real
    total = tl.zeros(rows_base.shape, dtype=tl.float32)
    out = tl.zeros(store_mask.shape, dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        lse = tl.load(part_lse_ptr + rows_base + s, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
        weight = tl.exp2(lse - lse_max)  # an empty split weighs 0
        part = tl.load(
            part_out_ptr + (rows_base + s)[:, None] * HEAD_DIM_P2 + offs_d[None, :],
            mask=store_mask,
            other=0.0,
            cache_modifier=".cg",
        )
        out += part * weight[:, None]
        total += weight
    return out / tl.where(total > 0, total, 1.0)[:, None]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,
    config: AttentionConfig | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    offloaded: Sequence[int] = (),
) -> torch.Tensor:
    """Attention of the ragged `query` [T, H, D] over the paged caches; returns [T, H, D] in query's dtype.
    An fp8 cache needs the layer's k_scale / v_scale (float32 [1] device tensors; see the module rules).
    `offloaded`: the requests `kiln.kernels.long_prompts.offloaded_requests` picked for the step; the
    kernel leaves their rows unwritten (the caller fills them), and is not launched when that is all.

    `num_splits` fixes the sequence split (CUDA-graph capture wants one value per graph); None picks
    it from the batch shape. `config` overrides the tile shape (for tuning sweeps). With neither, a
    mixed step whose first requests decode, enough of them (`attention_plan.split_leading_decodes`),
    takes two launches: those requests in decode tiles, the rest in prefill tiles. Rows of padding
    tokens (beyond query_start_loc[-1]) are zeros, as in the reference; the zeroing follows the host copy
    of query_start_loc, so a replayed CUDA graph leaves a different number of padding rows unspecified
    (nothing reads them).
    """
    num_tokens, num_heads, _ = query.shape
    if num_heads % k_cache.shape[2]:
        raise ValueError(f"{num_heads} query heads do not divide into {k_cache.shape[2]} KV heads")
    if query.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("paged_attention needs the head dimension contiguous")
    kv_scaled = check_kv_scales(k_cache, k_scale, v_scale)
    num_seqs = meta.num_seqs
    out = torch.empty_like(query)
    num_real_tokens = meta.query_start_loc_cpu[-1] if num_seqs else 0
    if num_real_tokens < num_tokens:
        out[num_real_tokens:].zero_()
    if num_seqs == 0 or num_tokens == 0 or len(offloaded) == num_seqs:
        return out

    # A mixed step's leading decodes get a launch of decode tiles (one token's group a tile, not a
    # prefill tile's BLOCK_Q tokens of which they would fill one): see split_leading_decodes.
    num_decodes = 0
    if meta.max_query_len > 1 and config is None and num_splits is None:
        num_decodes = meta.num_leading_decodes
    if num_decodes and split_leading_decodes(num_decodes, meta.seq_lens_cpu, fp8_cache=kv_scaled):
        parts = [(0, num_decodes, True), (num_decodes, num_seqs, False)]
    else:
        parts = [(0, num_seqs, meta.max_query_len == 1)]
    for first, last, decode in parts:
        if not decode and len(offloaded) == last - first:
            continue  # every prompt of this part is attended elsewhere
        _launch(query, k_cache, v_cache, out, meta, first, last, decode, scale, num_splits, config,
                k_scale, v_scale, kv_scaled, skip_long_prompts=bool(offloaded))  # fmt: skip
    return out


def _launch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    meta: AttentionMetadata,
    first: int,
    last: int,
    decode: bool,
    scale: float,
    num_splits: int | None,
    config: AttentionConfig | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    kv_scaled: bool,
    *,
    skip_long_prompts: bool,
) -> None:
    """One kernel launch over requests first..last-1 of the batch (`decode`: each has one query token),
    writing their rows of `out`. The kernel reads the metadata from request `first` on; query and out
    stay whole (rows are absolute). The last part also covers the batch's padding tokens."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    head_dim_p2 = triton.next_power_of_2(head_dim)
    num_seqs = last - first
    first_token = meta.query_start_loc_cpu[first]
    end_token = num_tokens if last == meta.num_seqs else meta.query_start_loc_cpu[last]
    part_tokens = end_token - first_token
    config = config or default_config(decode, head_dim_p2, fp8_cache=kv_scaled, max_seq_len=meta.max_seq_len)
    # Decode tiles hold one token's group; prefill tiles as many tokens as fill config.block_m rows.
    block_q = 1 if decode else max(1, config.block_m // group_p2)
    block_m = max(16, block_q * group_p2)
    block_n = config.block_n
    # Decode: one tile a request (and a token). Otherwise an upper bound on every request's
    # ceil(q_len / block_q), each request's tiles found by a binary search; request i's first tile is
    # query_start_loc[i] // block_q + i, so a part's tiles start at tile_base.
    tile_base = 0 if decode else first_token // block_q
    num_tiles = max(part_tokens, num_seqs) if decode else end_token // block_q - tile_base + num_seqs
    if num_splits is None:
        real_tiles = num_seqs if decode else num_tiles
        num_splits = choose_num_splits(real_tiles, num_kv_heads, meta.max_seq_len, num_sms(query.device))
    if num_splits > 1:
        part_out = torch.empty(
            (num_tokens, num_heads, num_splits, head_dim_p2), dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device)
        counters = split_counters(query.device, (tile_base + num_tiles) * num_kv_heads)
    else:
        part_out = part_lse = counters = out  # unused by the kernel when NUM_SPLITS == 1
    if not kv_scaled:  # unused operands: any tensor will do
        k_scale = v_scale = meta.seq_lens

    _paged_attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        out,
        part_out,
        part_lse,
        counters,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        k_scale,
        v_scale,
        num_seqs,
        tile_base,
        first,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        meta.block_tables.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_P2=group_p2,
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DECODE=decode,
        SKIP_LONG_PROMPTS=skip_long_prompts and not decode,
        LONG_PROMPT_TOKENS=long_prompts.LONG_PROMPT_TOKENS,
        KEYS_TRANSPOSED=config.keys_transposed,
        KV_SCALED=kv_scaled,
        F16_DOTS=kv_scaled and query.dtype == torch.bfloat16,
        LAUNCH_DEPENDENTS=pdl_enabled(query.device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


__all__ = [
    "builtin_config",
    "choose_num_splits",
    "decode_context_bounds",
    "default_config",
    "paged_attention",
]
