"""How much GPU memory a step needs beyond the weights, measured once before the KV cache is sized."""

from __future__ import annotations

import torch

from kiln.engine.attention_metadata import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM


@torch.inference_mode()
def profile_activation_bytes(
    model: LlamaForCausalLM, num_tokens: int, num_logits: int, block_size: int
) -> int:
    """Peak CUDA memory a step of `num_tokens` prefill tokens needs beyond the weights (one sequence,
    a throwaway KV cache just large enough), so the real KV cache can take the rest."""
    from kiln.kvcache.tensors import allocate_kv_cache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    num_tokens = min(num_tokens, model.max_positions)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    num_blocks = -(-num_tokens // block_size)
    kv = allocate_kv_cache(model.config, num_blocks, block_size, dtype, device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        query_start_loc_cpu=[0, num_tokens],
        seq_lens_cpu=[num_tokens],
        block_size=block_size,
    )
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model(ids, torch.arange(num_tokens, device=device), kv, meta)
    model.compute_logits(hidden[: min(num_logits, num_tokens)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del kv, hidden
    torch.cuda.empty_cache()
    return peak
