"""How close an engine's next-token distributions are to another's, and how well it predicts a text.

Shared by the quantized engines' accuracy gates (tests/model/test_quantized_accuracy.py) and the
perplexity benchmark (benchmarks/perplexity.py). Rules:

- Logits come from Kiln's own model (`LlamaForCausalLM` over a paged KV cache, one prefill of the whole
  token list), so they are what a served engine computes, quantized matmuls included.
- Row i of the logits predicts token i + 1. Perplexity is exp(mean negative log-likelihood) of every
  next token; KL is KL(reference || other) in nats, per position, averaged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM
from kiln.models.loader import load_model

BLOCK_SIZE = 16


def prefill_logits(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """The model's float32 logits [len(token_ids), vocab] of every position, in one prefill of one
    sequence over a fresh paged KV cache just large enough for it (blocks 0, 1, ... in order)."""
    if not token_ids:
        raise ValueError("prefill_logits needs at least one token")
    cfg = model.config
    n = len(token_ids)
    num_blocks = -(-n // BLOCK_SIZE)
    embed = model.model.embed_tokens.weight  # the activations' dtype and device, whatever the scheme
    device, dtype = embed.device, embed.dtype
    shape = (num_blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    kv_caches = [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.num_hidden_layers)
    ]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_cpu=[0, n],
        seq_lens_cpu=[n],
        block_size=BLOCK_SIZE,
    )
    ids = torch.tensor(token_ids, device=device)
    with torch.no_grad():
        hidden = model(ids, torch.arange(n, device=device), kv_caches, meta)
        return model.compute_logits(hidden).float()


def load_float32(engine_dir: Path) -> LlamaForCausalLM:
    """The engine's model on the CPU in float32 (a quantized engine keeps its int8/fp8 weights)."""
    model, _ = load_model(engine_dir, dtype=torch.float32, device="cpu")
    return model


def text_logits(engine_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """The engine's float32 logits [len(token_ids), vocab] of every position, on the CPU, in one prefill."""
    return prefill_logits(load_float32(engine_dir), token_ids)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || other) in nats) over the positions (rows)."""
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (reference.argmax(-1) == other.argmax(-1)).float().mean().item(), kl.mean().item()


def perplexity(logits: torch.Tensor, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood of each next token of the text)."""
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(token_ids[1:]))
    return math.exp(nll.item())
