"""The CPU KV cache is plain zero pages: mapped on first touch, never marked for transparent huge pages.

Why it matters: numpy's zeros (the allocation before) madvises large arrays for huge pages, and the
first write into each layer's K and V then faulted in a zeroed 2 MiB page, ~0.3 s of the first
request's step on the 2-core CPU machine. Checked on the mapping's VmFlags (`hg` = MADV_HUGEPAGE).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.config import ModelConfig
from kiln.kvcache.tensors import allocate_kv_cache

SMAPS = Path("/proc/self/smaps")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address`."""
    inside = False
    for line in SMAPS.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not SMAPS.exists(), reason="needs Linux's /proc/self/smaps")
def test_the_cpu_kv_cache_is_zeroed_and_not_madvised_for_huge_pages() -> None:
    config = ModelConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=128,
    )
    # 16 MiB: large enough for numpy to have madvised it
    caches = allocate_kv_cache(config, num_blocks=512, block_size=16, dtype=torch.float32, device="cpu")
    k0, _ = caches[0]
    # Inside each slab, not its first byte: numpy's madvise began at the first whole page after it.
    for k, v in caches:
        for cache in (k, v):
            assert "hg" not in _vm_flags(cache.data_ptr() + cache.nbytes // 2)
    assert all(float(k.abs().sum()) == 0 and float(v.abs().sum()) == 0 for k, v in caches)
    k0[3, 5] = 1.0
    assert float(k0.sum()) == 1.0 * config.num_key_value_heads * config.head_dim
    assert float(caches[1][0].abs().sum()) == 0  # the views do not overlap
