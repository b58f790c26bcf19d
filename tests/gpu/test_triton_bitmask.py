"""The Triton token-bitmask kernel against the PyTorch reference: random masks on random shapes, a
vocabulary narrower and wider than the mask (a model's padded vocabulary), float32 and 16-bit logits,
strided rows; the result must be bit-identical (it only writes -inf)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import INTERPRET

from kiln.kernels import reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        pytest.param(
            torch.bfloat16, marks=pytest.mark.skipif(INTERPRET, reason="no bf16 in the interpreter")
        ),
    ],
)
@pytest.mark.parametrize(
    ("rows", "vocab", "words"),
    [
        (1, 32, 1),  # one word, exactly
        (3, 1000, 32),  # the mask covers more than the vocabulary
        (5, 1100, 32),  # the vocabulary is padded past the mask: those tokens are never allowed
        (2, 49_152, 1_536),  # SmolLM2's tokenizer
        (4, 128_256, 4_008),  # Llama 3's
    ],
)
def test_apply_token_bitmask_matches_reference(device, dtype, rows, vocab, words):
    from kiln.kernels.triton_bitmask import apply_token_bitmask

    gen = torch.Generator().manual_seed(vocab + rows)
    logits = torch.randn(rows, vocab + 7, generator=gen).to(dtype)[:, :vocab]  # rows strided past vocab
    mask = torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=gen, dtype=torch.int32)
    mask[0] = -1  # every token allowed
    if rows > 1:
        mask[1] = 0  # none allowed
    expected = logits.clone()
    reference.apply_token_bitmask(expected, mask)
    out = logits.to(device)
    apply_token_bitmask(out, mask.to(device))
    assert torch.equal(out.cpu(), expected)
    assert torch.isinf(expected[0]).sum() == max(0, vocab - 32 * words)
    if rows > 1:
        assert torch.isinf(expected[1]).all()


def test_apply_token_bitmask_refuses_a_mask_of_another_shape(device):
    from kiln.kernels.triton_bitmask import apply_token_bitmask

    logits = torch.zeros(2, 64, device=device)
    with pytest.raises(ValueError, match="int32 mask"):
        apply_token_bitmask(logits, torch.zeros(3, 2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="int32 mask"):
        apply_token_bitmask(logits, torch.zeros(2, 2, dtype=torch.int64, device=device))
