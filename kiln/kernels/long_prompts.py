"""Long fresh prompts' attention through cuDNN's fused attention (torch SDPA), beside the Triton kernel.

On Hopper, cuDNN's causal attention runs 1.5-1.9x the Triton kernel's TFLOP/s on a prompt of 1k-32k
tokens (H100, Llama-3.1-8B heads: docs/results/2026-12-06-h100/README.md), so a step hands long prompts
to it and the Triton launch skips them. Everything else (decodes, shorter prompts, chunks after a
cached prefix, fp8 caches) stays in the Triton kernel.

Rules:
- A request is offloaded when it is a fresh prompt (no cached context: its whole context is this
  step's tokens) of at least `LONG_PROMPT_TOKENS` tokens, the cache is 16-bit, and the GPU is one
  where the offload was measured to pay (`device_offloads`). The Triton kernel applies the same rule
  on the device (`is_offloaded`, with the same constant), so the two never both write a row.
- Its keys and values are gathered from the paged cache into contiguous buffers. Query, keys and
  values are padded with zeros to `bucket(length)` tokens: cuDNN builds an execution plan for each new
  shape (55-80 ms on an H100, then cached for the process), so lengths share a plan per bucket. Causal
  attention from position 0 never lets a real query see a padding key; the padding queries' rows are
  dropped. Padding costs quadratic work, so the buckets are fine (under 1/32 longer).
- The semantics are `kiln.kernels.reference.paged_attention`'s; off CUDA, `attend_fresh_prompt` runs
  torch's default SDPA (the CPU tests check the gathering and padding there).
- Never inside a CUDA graph: the shapes come from the host's view of the step. The graphed steps
  (decode, single prompts up to 512 tokens) hold no request this long.
- The first offload of a process also loads cuDNN (0.1-0.9 s on an H100). The start-up's memory
  profile runs `suspended()`, so start-to-ready does not pay it; the first long prompt served does,
  once. (The offload's buffers, copies of one prompt's query, K/V and output, stay below the MLP's peak.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.torch_version import TorchVersion

from kiln.kernels.attention_metadata import AttentionMetadata

# The shortest prompt handed to cuDNN. Attention's share of a prefill grows with its length: on an
# H100 (Llama-3.1-8B), the offload cut TTFT by 2-6% from 1k to 4k tokens (within the runs' spread),
# 7-9% at 8k and 13-20% at 16k-32k, while a new bucket's plan costs its first prompt 35-80 ms: below 8k
# a plan takes tens of prompts to repay.
LONG_PROMPT_TOKENS = 8192
_MIN_BUCKET = 256


def is_offloaded(q_len: int, seq_len: int) -> bool:
    """The rule for one request of a step on an eligible device (the Triton kernel's too)."""
    return q_len >= LONG_PROMPT_TOKENS and seq_len == q_len


def bucket(num_tokens: int) -> int:
    """The padded length of a prompt: a multiple of 256 tokens and of 1/64 of its power of two. A
    prompt long enough to offload grows by under 1/32 (under ~6% more work); 32 plans an octave."""
    step = max(_MIN_BUCKET, (1 << (num_tokens - 1).bit_length()) // 64)
    return -(-num_tokens // step) * step


_suspended = False


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No offload inside this block (see the rules)."""
    global _suspended
    before, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = before


@functools.cache
def _offloading_gpu(index: int) -> bool:
    # torch 2.11 is the version measured and tested; SDPA took `enable_gqa` only from 2.5.
    return (
        torch.cuda.get_device_capability(index) == (9, 0)
        and torch.backends.cudnn.is_available()
        and TorchVersion(torch.__version__) >= "2.11"
    )


def device_offloads(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether this step's long prompts may go to cuDNN: a Hopper GPU with cuDNN and torch 2.11 or
    later, a 16-bit query and cache of one dtype, and heads of 64 or 128 (the sizes tested; Llama's and
    SmolLM2's)."""
    return (
        not _suspended
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and k_cache.dtype == query.dtype
        and query.shape[-1] in (64, 128)
        and _offloading_gpu(
            query.device.index if query.device.index is not None else torch.cuda.current_device()
        )
    )


def offloaded_requests(meta: AttentionMetadata) -> list[int]:
    """The requests of the step that `is_offloaded` picks (from the host's lists, no device sync). It
    runs for every layer of an eager step, so a step with no long query returns before the scan."""
    if meta.max_query_len < LONG_PROMPT_TOKENS:
        return []
    starts = meta.query_start_loc_cpu
    return [
        i for i, seq_len in enumerate(meta.seq_lens_cpu) if is_offloaded(starts[i + 1] - starts[i], seq_len)
    ]


def _gather(cache: torch.Tensor, table_row: torch.Tensor, length: int, padded: int) -> torch.Tensor:
    """The first `length` tokens' rows of one request's paged `cache`, contiguous [padded, Hkv, D],
    zeros after them (the cache's stale slots and the padding must not hold NaN: 0 x NaN is NaN)."""
    block_size, num_kv_heads, head_dim = cache.shape[1:]
    num_blocks = -(-length // block_size)
    rows = max(padded, num_blocks * block_size)
    out = torch.empty((rows, num_kv_heads, head_dim), dtype=cache.dtype, device=cache.device)
    blocks = out[: num_blocks * block_size].view(num_blocks, block_size, num_kv_heads, head_dim)
    torch.index_select(cache, 0, table_row[:num_blocks].to(torch.long), out=blocks)
    out[length:].zero_()
    return out[:padded]


def attend_fresh_prompt(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    request: int,
    out: torch.Tensor,
) -> None:
    """Causal attention of request `request`'s rows (a fresh prompt, see the rules) into `out`'s rows."""
    start, end = meta.query_start_loc_cpu[request], meta.query_start_loc_cpu[request + 1]
    length = end - start
    if meta.seq_lens_cpu[request] != length:
        raise ValueError(f"request {request} has a cached context: not a fresh prompt")
    padded = bucket(length)
    num_heads, head_dim = query.shape[1:]
    table_row = meta.block_tables[request]
    keys = _gather(k_cache, table_row, length, padded)
    values = _gather(v_cache, table_row, length, padded)
    q = query[start:end]
    if padded != length:
        q = torch.cat([q, q.new_zeros((padded - length, num_heads, head_dim))])
    # [1, heads, tokens, D] views of the token-major buffers: cuDNN reads the strides as they are.
    q, keys, values = (t.transpose(0, 1).unsqueeze(0) for t in (q, keys, values))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if query.is_cuda else contextlib.nullcontext():
        attended = F.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=scale, enable_gqa=num_heads != keys.shape[1]
        )
    out[start:end] = attended[0, :, :length].transpose(0, 1)
