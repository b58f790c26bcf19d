"""An eager step's rotary launch compiles no kernel variant of its own for an odd token count (no GPU).

A step's positions and slots reach the device as views of one staged buffer (HostStaging). Triton keys a
kernel variant on each pointer's 16-byte alignment, so when the positions followed an odd number of
input ids unpadded, every eager step of an odd token count met a rotary variant that no warm-up of even
steps had built: built mid-run, with every stream waiting. The keys come from the launcher's own binder
for sm_90, fed what `rotary_store_kv` passes. Skipped where Triton is not installed (the CPU CI).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_cases import record_launch_keys

from kiln.engine.host_transfer import HostStaging
from kiln.kernels import triton_cache as tc

pytestmark = pytest.mark.gpu
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 2, 64, 16


@pytest.fixture
def launch_keys(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every rotary launch's specialisation key, in order (the kernel itself is not run)."""
    return record_launch_keys(monkeypatch, tc, "_rotary_kernel")


def _eager_step(num_tokens: int) -> None:
    """What an eager step's attention layer hands `rotary_store_kv`: the staged positions and slots in
    the order the model runner stages them, and q / k / v as views of one fused projection."""
    _ids, positions, slots, _logits = HostStaging(torch.device("cpu")).to_device(
        [[1] * num_tokens, list(range(num_tokens)), list(range(num_tokens)), [num_tokens - 1]]
    )
    qkv = torch.zeros(num_tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    cache = torch.zeros(8, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    cos_sin = torch.zeros(256, HEAD_DIM, dtype=torch.float32)
    tc.rotary_store_kv(
        positions,
        q.view(num_tokens, HEADS, HEAD_DIM),
        k.view(num_tokens, KV_HEADS, HEAD_DIM),
        v.view(num_tokens, KV_HEADS, HEAD_DIM),
        cos_sin,
        cache,
        cache,
        slots,
    )


def test_odd_and_even_steps_share_one_rotary_variant(launch_keys: list[tuple]) -> None:
    for num_tokens in range(1, 9):
        _eager_step(num_tokens)
    assert len(launch_keys) == 8
    assert len(set(launch_keys)) == 1, "a token count's parity changed the rotary kernel's key"
