"""`BlockPool`: the KV-cache blocks, their reference counts, the free queue and the hash -> block map.

Rules:
- A block is in use while its ref_cnt > 0 (one ref per request whose block table holds it) and free
  at ref_cnt 0. Every free block sits in the free queue, in eviction order: allocation takes from
  the FRONT (least recently used first), freeing appends at the END. Initially the queue is
  0, 1, ..., N-1.
- A full block may carry a hash (and the tokens and parent hash it was made from) and be in the
  hash map, whether in use or free: a free hashed block still holds valid KV and can be hit. Its
  hash is dropped only when the block is allocated again (lazy reclamation) or by
  reset_prefix_cache.
- Hitting a free block "touches" it: it leaves the free queue, so it cannot be evicted while used.
- The map holds at most one block per hash; registering a hash that is already present is refused
  (the second block simply stays an ordinary, unhashed block).
All operations are O(1) per block: the free queue is an OrderedDict keyed by block id.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of block_size token slots in every layer's K and V cache."""

    block_id: int
    ref_cnt: int = 0
    # Set while the block is registered for prefix reuse; None for partial or never-cached blocks.
    block_hash: int | None = None
    # What the hash was made from, compared on every hit so a hash collision can never serve wrong KV.
    parent_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class BlockPool:
    """Owns the blocks; the manager owns the per-request block tables."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks: list[KVBlock] = [KVBlock(block_id=i) for i in range(num_blocks)]
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, KVBlock] = {}

    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (ref_cnt 0, hashed or not)."""
        return len(self._free_queue)

    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_queue)

    def free_queue(self) -> list[int]:
        """The free block ids in eviction order (first is allocated next). A copy, for tests and debugging."""
        return list(self._free_queue)

    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the hash map (used or free)."""
        return len(self._cached)

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take num_blocks from the front of the free queue with ref_cnt 1, evicting any hash they carry.

        Raises ValueError when fewer are free; callers check num_free_blocks() first.
        """
        if num_blocks > len(self._free_queue):
            raise ValueError(f"cannot allocate {num_blocks} blocks, only {len(self._free_queue)} free")
        allocated = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict_hash(block)
            block.ref_cnt = 1
            allocated.append(block)
        return allocated

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more ref on each block; a free block leaves the free queue (its hash stays)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one ref on each block; those reaching 0 join the END of the free queue in the given order.

        The order given is the eviction order: pass a request's blocks tail first so its head blocks,
        the ones most likely shared by later prompts, are evicted last.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than it was referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = None

    def lookup(self, block_hash: int) -> KVBlock | None:
        """The block registered under block_hash, if any. Callers must still verify its tokens."""
        return self._cached.get(block_hash)

    def cache_block(
        self, block: KVBlock, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> bool:
        """Register a full, in-use block under block_hash. False (nothing changed) if the hash is taken
        or the block already carries a hash."""
        if block.block_hash is not None or block_hash in self._cached:
            return False
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every hash, only when no block is in use (a running request may be registering hashes).

        Returns False and changes nothing otherwise. The free queue keeps its order.
        """
        if self.num_used_blocks() > 0:
            return False
        for block in self._cached.values():
            block.block_hash = None
            block.parent_hash = None
            block.token_ids = None
        self._cached.clear()
        return True

    def _evict_hash(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = None
