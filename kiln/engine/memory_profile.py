"""The KV cache's size: how much GPU memory a step needs beyond the weights, measured once, and the
number of blocks that leaves room for."""

from __future__ import annotations

import torch

from kiln.config import EngineConfig
from kiln.kernels import long_prompts
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kvcache.tensors import allocate_kv_cache, num_blocks_for_budget
from kiln.models.llama import LlamaForCausalLM

CPU_KV_BUDGET_BYTES = 1 << 30


@torch.inference_mode()
def profile_activation_bytes(
    model: LlamaForCausalLM, num_tokens: int, num_logits: int, block_size: int
) -> int:
    """Peak CUDA memory a step of `num_tokens` prefill tokens needs beyond the weights (one sequence,
    a throwaway KV cache just large enough), so the real KV cache can take the rest."""
    device = next(model.parameters()).device
    dtype = model.kv_cache_dtype
    num_tokens = min(num_tokens, model.max_positions)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    num_blocks = -(-num_tokens // block_size)
    kv = allocate_kv_cache(model.config, num_blocks, block_size, dtype, device)
    meta = AttentionMetadata.one_prompt(num_tokens, block_size, device)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    with long_prompts.suspended():  # loading cuDNN would cost start-up up to ~0.9 s (long_prompts)
        hidden = model(ids, torch.arange(num_tokens, device=device), kv, meta)
    model.compute_logits(hidden[: min(num_logits, num_tokens)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del kv, hidden
    torch.cuda.empty_cache()
    return peak


def num_kv_blocks_from_memory(
    model: LlamaForCausalLM,
    config: EngineConfig,
    block_size: int,
    max_tokens_per_step: int,
    max_num_seqs: int,
    cap: int,
) -> int:
    """KV blocks for `config`'s memory budget: kv_cache_memory_bytes if given; on CUDA what is left of
    gpu_memory_utilization of the card after the weights and the largest step's activations; on CPU
    1 GiB, at most `cap` blocks; blocks of the model's KV-cache dtype (an fp8 cache's are half a 16-bit
    one's). Raises ValueError when not even one block fits."""
    device = next(model.parameters()).device
    dtype = model.kv_cache_dtype
    if config.kv_cache_memory_bytes is not None:
        budget = config.kv_cache_memory_bytes
    elif device.type == "cuda":
        # Profile the largest step, then give the KV cache what is left of this engine's share of the
        # card (gpu_memory_utilization of the total, as in vLLM: other processes' memory is not
        # counted against it), never more than is free; 5% stays back for CUDA graphs and slack.
        activations = profile_activation_bytes(model, max_tokens_per_step, max_num_seqs, block_size)
        free, total = torch.cuda.mem_get_info(device)
        share = config.gpu_memory_utilization * total
        weights = torch.cuda.memory_allocated(device)
        budget = int(min(share - weights - activations, free - activations) * 0.95)
    else:
        budget = CPU_KV_BUDGET_BYTES
    num_blocks = num_blocks_for_budget(budget, model.config, block_size, dtype)
    if num_blocks < 1:
        raise ValueError(f"no memory left for the KV cache (budget {budget} bytes)")
    return min(num_blocks, cap) if device.type == "cpu" else num_blocks
