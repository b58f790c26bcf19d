"""Shared pieces of the accuracy gates (test_quantized_accuracy.py, test_kv_cache_accuracy.py): the fixed text
and the gate itself, over full-sequence logits from kiln.bench.accuracy."""

from __future__ import annotations

import codecs

import torch

from kiln.bench.accuracy import agreement, perplexity


def zen_of_python() -> str:
    """The Zen of Python, decoded: a real English text every Python ships, unchanged since 2004."""
    import this  # prints the text once; the module holds it rot13-encoded

    return codecs.decode(this.s, "rot13")


def check_gate(name: str, reference: torch.Tensor, other: torch.Tensor, ids: list[int], gate: tuple) -> None:
    """Print top-1 agreement, KL and perplexities (for the docs, with `-s`); assert `gate` = (least top-1,
    most mean KL)."""
    top1, kl = agreement(reference, other)
    print(
        f"{name}: top-1 {top1:.3f}, KL {kl:.4f}, perplexity {perplexity(other, ids):.2f} "
        f"(reference {perplexity(reference, ids):.2f}) over {len(ids)} tokens"
    )
    least_top1, most_kl = gate
    assert top1 >= least_top1 and kl <= most_kl, (name, top1, kl)
