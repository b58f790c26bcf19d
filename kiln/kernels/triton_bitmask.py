"""A structured output's token bitmask applied to the logits in Triton: one pass, writes only.

Rule (the same as `kiln.kernels.reference.apply_token_bitmask`): logits [rows, vocab] (float, on the
device) and mask [rows, words] int32, bit j of word w allowing token 32 * w + j; every logit whose bit is 0
becomes -inf, in place, and so does every logit past the mask's 32 * words tokens (a model's vocabulary
padded past its tokenizer's). Each program owns BLOCK tokens of one row: it reads the mask words of its
tokens (32 lanes share a word, one cache line serves 1,024 tokens) and stores -inf where a bit is 0,
without reading the logits: the work is the stores, which is why it beats a masked_fill over an expanded
boolean mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# One compiled variant for every shape: `kiln tune`'s warm-up compiles it without knowing the tokenizer.
@triton.jit(do_not_specialize=["stride_logits", "stride_mask", "vocab", "width"])
def _apply_token_bitmask_kernel(
    logits_ptr,
    mask_ptr,
    stride_logits,
    stride_mask,
    vocab,
    width,  # tokens the mask covers: 32 * words
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab
    covered = tokens < width
    words = tl.load(mask_ptr + row * stride_mask + tokens // 32, mask=in_vocab & covered, other=0)
    allowed = ((words >> (tokens % 32)) & 1) != 0
    minus_inf = tl.full((BLOCK,), float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_logits + tokens, minus_inf, mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set every logit whose bit in `mask` is 0, or past the mask's width, to -inf (in place)."""
    if logits.dim() != 2 or mask.dim() != 2 or mask.shape[0] != logits.shape[0] or mask.dtype != torch.int32:
        raise ValueError(
            f"apply_token_bitmask needs logits [rows, vocab] and an int32 mask [rows, words], got "
            f"{tuple(logits.shape)} and {mask.dtype} {tuple(mask.shape)}"
        )
    if logits.stride(1) != 1 or mask.stride(1) != 1:
        raise ValueError("apply_token_bitmask needs the vocabulary dimension of both tensors contiguous")
    rows, vocab = logits.shape
    if rows == 0 or vocab == 0:
        return
    block = 1024
    _apply_token_bitmask_kernel[(rows, triton.cdiv(vocab, block))](
        logits,
        mask,
        logits.stride(0),
        mask.stride(0),
        vocab,
        mask.shape[1] * 32,
        BLOCK=block,
        num_warps=4,
    )
