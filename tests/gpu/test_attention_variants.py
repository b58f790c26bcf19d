"""A mixed step's split attention launches compile no kernel variant of their own (no GPU needed).

Triton compiles a kernel once per specialisation key: its constexprs, and for each pointer and integer
argument whether it is a multiple of 16 (or 1). A key first met while serving is a compile that stalls
every stream for seconds, and one no warm-up met is missing from an engine's `kernels/`. So the second
launch of a split step (the prompts after the leading decodes) must reuse the key of the same prompts in
a step of their own, whatever the number of decodes before them; the first launch, that of the same
decodes alone. The keys come from the launcher's own binder for sm_90, fed what `paged_attention` passes.
Skipped where Triton is not installed (the CPU CI).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_cases import record_launch_keys

from kiln.kernels import attention_plan
from kiln.kernels import triton_attention as ta
from kiln.kernels.attention_metadata import AttentionMetadata

pytestmark = pytest.mark.gpu
BLOCK_SIZE = 16


@pytest.fixture
def launch_keys(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every attention launch's specialisation key, in order (the kernel itself is not run)."""
    keys = record_launch_keys(monkeypatch, ta, "_paged_attention_kernel")
    monkeypatch.setattr(ta, "num_sms", lambda device: 132)
    monkeypatch.setattr(ta, "split_counters", lambda device, n: torch.zeros(n, dtype=torch.int32))
    return keys


def _step(keys: list[tuple], q_lens: list[int], seq_lens: list[int]) -> list[tuple]:
    keys.clear()
    tables = torch.arange(len(q_lens) * 64, dtype=torch.int32).reshape(len(q_lens), 64)
    meta = AttentionMetadata.for_batch(q_lens, seq_lens, tables, BLOCK_SIZE)
    query = torch.zeros(sum(q_lens), 32, 128, dtype=torch.bfloat16)
    cache = torch.zeros(64, BLOCK_SIZE, 8, 128, dtype=torch.bfloat16)
    ta.paged_attention(query, cache, cache, meta, 0.1)
    return list(keys)


@pytest.mark.parametrize("extra", [0, 1, 2, 3])  # the decodes' count modulo 4: an int32 view's alignment
def test_split_launches_reuse_the_keys_of_their_parts_alone(launch_keys: list[tuple], extra: int) -> None:
    decodes = attention_plan.MIN_SPLIT_DECODES + extra
    prompt = [300, 300]
    split = _step(launch_keys, [1] * decodes + prompt[:1], [500] * decodes + prompt[1:])
    assert len(split) == 2
    assert split[0] == _step(launch_keys, [1] * decodes, [500] * decodes)[0]
    assert split[1] == _step(launch_keys, prompt[:1], prompt[1:])[0]
