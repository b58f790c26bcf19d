"""The sampler's plain greedy path on the GPU: the argmax of 16-bit logits at a real vocabulary and
batch, ties included, equals the argmax of their float32 widening (what every other path samples from)."""

from __future__ import annotations

import pytest
import torch

from kiln.engine.sampler import Sampler, SamplingBatch, SamplingRow
from kiln.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def _rows(n: int, **params) -> list[SamplingRow]:
    return [SamplingRow(SamplingParams(temperature=0.0, **params), [], [], None, []) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 512])
def test_plain_greedy_on_the_gpu_matches_the_float32_argmax(device, dtype, rows):
    if device.type != "cuda":
        pytest.skip("the GPU's argmax is what this checks")
    vocab = 128_256
    generator = torch.Generator(device=device).manual_seed(rows)
    logits = torch.randn(rows, vocab, device=device, generator=generator).to(dtype)
    # Ties at the maximum, far apart in the row: the first index must win on both paths.
    top = logits.max(dim=-1, keepdim=True).values + 1
    logits.scatter_(
        1, torch.tensor([[vocab - 1, 70_000, 5]], device=device).expand(rows, 3), top.expand(rows, 3)
    )
    batch = SamplingBatch.build(_rows(rows), vocab, device)
    assert batch.plain_greedy
    plain = Sampler()(logits.clone(), batch).token_ids
    assert plain.tolist() == logits.float().argmax(dim=-1).tolist() == [5] * rows
    widened = Sampler()(logits.clone(), SamplingBatch.build(_rows(rows, logprobs=0), vocab, device)).token_ids
    assert widened.tolist() == plain.tolist()
