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

from kiln.build.calibrate import prefill
from kiln.models.llama import LlamaForCausalLM
from kiln.models.loader import load_model


def prefill_logits(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """The model's float32 logits [len(token_ids), vocab] of every position, in one prefill of one
    sequence over a fresh paged KV cache (`kiln.build.calibrate.prefill`, what calibration runs too)."""
    if not token_ids:
        raise ValueError("prefill_logits needs at least one token")
    with torch.no_grad():
        return model.compute_logits(prefill(model, token_ids)).float()


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
