"""Paged KV cache: block pool, prefix-reuse hashing and per-request block tables (pure Python).

`kiln.kvcache.tensors` (the device tensors and their sizing) imports torch and is not re-exported here,
so the scheduler and its tests import this package without torch.
"""

from kiln.kvcache.block_pool import BlockPool, KVBlock
from kiln.kvcache.hashing import hash_block_tokens
from kiln.kvcache.manager import KVCacheManager, KVCacheStats

__all__ = ["BlockPool", "KVBlock", "KVCacheManager", "KVCacheStats", "hash_block_tokens"]
