"""Long fresh prompts through cuDNN (kiln.kernels.long_prompts) beside the Triton kernel: the dispatched
`kernels.paged_attention` against the reference on mixed steps,. On a GPU
that is not Hopper nothing is offloaded and the same checks hold (the engine's test: test_engine_gpu)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, INTERPRET, long_context, make_paged_batch, rel_error

from kiln import kernels
from kiln.kernels import long_prompts, reference

pytestmark = pytest.mark.gpu

BOUNDS = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def from_1024_tokens(monkeypatch):
    """Offload from 1,024 tokens, so the reference attention's score matrices stay small; the Triton
    kernel reads the threshold from the module at each launch, as the host rule does."""
    monkeypatch.setattr(long_prompts, "LONG_PROMPT_TOKENS", 1024)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _check(batch, dtype, offloaded):
    scale = batch.query.shape[-1] ** -0.5
    eligible = long_prompts.device_offloads(batch.query, batch.k_cache)
    assert eligible == (_hopper() and not INTERPRET)
    assert long_prompts.offloaded_requests(batch.meta) == offloaded
    out = kernels.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, scale)
    ref = reference.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, scale)
    err = rel_error(out, ref)
    assert err < BOUNDS[dtype], f"relative error {err:.2e}"
    for i in offloaded:  # each offloaded request's rows on their own: no other request's error hides them
        rows = slice(batch.meta.query_start_loc_cpu[i], batch.meta.query_start_loc_cpu[i + 1])
        assert rel_error(out[rows], ref[rows]) < BOUNDS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64), (4, 4, 128)])
def test_a_mixed_step_with_long_fresh_prompts(
    device, from_1024_tokens, num_heads, num_kv_heads, head_dim, dtype
):
    if INTERPRET:
        pytest.skip("prompts of 1,024+ tokens are too slow for the interpreter")
    # A decode, a fresh 1030 (offloaded), a short chunk, a fresh 1023 (not), a 1100 chunk after a cached
    # prefix (not), a fresh 2048 (offloaded), a decode; and two padding rows.
    q_lens = [1, 1030, 40, 1023, 1100, 2048, 1]
    contexts = [long_context(3000), 0, 70, 0, 500, 0, 17]
    batch = make_paged_batch(
        q_lens, contexts, num_heads, num_kv_heads, head_dim, 16, dtype, device, seed=4, num_padding_tokens=2
    )
    _check(batch, dtype, [1, 5])
    out = kernels.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, head_dim**-0.5)
    assert (out[-2:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_step_of_one_long_prompt_launches_no_triton_kernel(device, from_1024_tokens, dtype):
    if INTERPRET:
        pytest.skip("prompts of 1,024+ tokens are too slow for the interpreter")
    batch = make_paged_batch([4097], [0], 32, 8, 128, 32, dtype, device, seed=5)
    _check(batch, dtype, [0])


def test_the_threshold_itself(device):
    # 8,192 tokens offloaded and 8,191 not, in one step; small heads keep the reference affordable.
    if INTERPRET:
        pytest.skip("prompts of 8,192 tokens are too slow for the interpreter")
    batch = make_paged_batch([8191, 8192, 1], [0, 0, 40], 2, 1, 64, 16, torch.bfloat16, device, seed=6)
    _check(batch, torch.bfloat16, [1])


def test_an_fp8_cache_stays_in_the_triton_kernel(device):
    query = torch.zeros(8, 4, 128, dtype=torch.bfloat16, device=device)
    k_cache = torch.zeros(2, 16, 2, 128, dtype=torch.float8_e4m3fn, device=device)
    assert not long_prompts.device_offloads(query, k_cache)
    assert not long_prompts.device_offloads(query, k_cache.to(torch.float16))  # dtypes differ
