"""`KVCacheManager`: per-request block tables over a `BlockPool`, with prefix reuse by block hash.

The scheduler's view of the paged KV cache. Pure bookkeeping: block ids and counts, no tensors.
A step of the scheduler uses it like this:

    hits, num_hit_tokens = manager.get_computed_blocks(prompt)          # new request only
    new = manager.allocate_slots(rid, tokens, num_computed, num_new, hits)
    if new is None: ...preempt someone, or leave the request waiting...
    ...when the request finishes, is aborted or preempted: manager.free(rid)

Blocks are registered for reuse as soon as allocate_slots makes them full, i.e. before the model has
written their KV. That is safe because the KV of a step's tokens is written before attention reads
the cache, so a request that hits them in the same or a later step reads finished KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kiln.kvcache.block_pool import BlockPool, KVBlock
from kiln.kvcache.hashing import extend_block_hashes, iter_block_hashes


@dataclass(slots=True)
class KVCacheStats:
    num_blocks: int
    num_used_blocks: int  # ref_cnt > 0
    num_free_blocks: int
    prefix_queries: int  # tokens of admitted requests looked up in the prefix cache (cumulative)
    prefix_hits: int  # of those, tokens found in cache (cumulative)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


@dataclass(slots=True)
class _RequestBlocks:
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of the request's leading full blocks, all registered (or offered) to the pool;
    # kept so each block is hashed once, when it becomes full, not on every decode step.
    block_hashes: list[int] = field(default_factory=list)


class KVCacheManager:
    """Gives requests blocks of `block_size` token slots out of `num_blocks`, sharing cached prefixes."""

    def __init__(
        self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True, hash_salt: str = ""
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_salt = hash_salt
        self.pool = BlockPool(num_blocks)
        self._requests: dict[str, _RequestBlocks] = {}
        self._prefix_queries = 0
        self._prefix_hits = 0

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest chain of cached FULL blocks that is a prefix of token_ids, as (block_ids, num_tokens).

        Never covers the last token (at most (len-1)//block_size blocks) so there are logits to sample.
        Takes no references and counts nothing (allocate_slots does both, once the request is admitted,
        so a request that waits several steps for room is counted once). Returns ([], 0) when prefix caching is off. Verifies the stored token ids
        (and parent hash) on every hit, so a hash collision is a miss, never wrong KV.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        max_blocks = max(0, (len(token_ids) - 1) // bs)
        hits: list[int] = []
        parent: int | None = None
        for i, block_hash in enumerate(iter_block_hashes(token_ids, bs, self.hash_salt, max_blocks)):
            block = self.pool.lookup(block_hash)
            if block is None or not _holds(block, parent, token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(block.block_id)
            parent = block_hash
        return hits, len(hits) * bs

    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
        *,
        num_unknown_tokens: int = 0,
    ) -> list[int] | None:
        """Give request_id room for num_new_tokens tokens after its computed ones.

        num_computed_tokens counts tokens already in its blocks, NOT including new_computed_blocks (prefix
        hits from get_computed_blocks, only passed on a request's first allocation). token_ids: the
        request's tokens so far (prompt + generated; at least num_computed+len(new_computed)*bs+num_new).
        Returns the NEWLY allocated block ids (possibly []), or None when the free pool cannot supply them
        — and then nothing at all changed (no refs taken, no stats). On success: takes a ref on each
        new_computed_block (removing it from the free queue if it was there), appends them and the new
        blocks to the request's block table, and (prefix caching on) registers the hash of every block
        that becomes full with the tokens token_ids[:num_computed+hits+num_new] so later requests can
        hit it. Raises ValueError for arguments that break these rules (e.g. stale hit blocks).

        num_unknown_tokens: how many of the tokens to allocate come after token_ids, sampled by a step
        still running on the device (overlapped steps). They get slots, but a block holding one is
        registered for reuse only by a later call whose token_ids include it.
        """
        bs = self.block_size
        request = self._requests.get(request_id)
        num_held = len(request.block_ids) if request is not None else 0
        if num_computed_tokens < 0 or num_new_tokens < 0:
            raise ValueError("num_computed_tokens and num_new_tokens must be >= 0")
        num_total = num_computed_tokens + num_new_tokens
        if (
            request is not None
            and not new_computed_blocks
            and num_total <= num_held * bs
            and len(token_ids) + num_unknown_tokens >= num_total
        ):
            # Room in the blocks held (most decode steps): what the general path below does when it
            # allocates nothing, without its bookkeeping for hits and new blocks.
            if self.enable_prefix_caching:
                self._register_full_blocks(request, token_ids, min(num_total, len(token_ids)))
            return []
        if num_computed_tokens > num_held * bs:
            raise ValueError(f"{num_computed_tokens} computed tokens do not fit in {num_held} blocks")
        hit_blocks = [self.pool.blocks[block_id] for block_id in new_computed_blocks]
        if hit_blocks:
            self._check_hits(hit_blocks, token_ids, num_held)
        num_total = num_computed_tokens + len(hit_blocks) * bs + num_new_tokens
        if len(token_ids) + num_unknown_tokens < num_total:
            raise ValueError(
                f"token_ids has {len(token_ids)} tokens (+{num_unknown_tokens} unknown), "
                f"the allocation covers {num_total}"
            )

        num_new_blocks = max(0, self.num_blocks_needed(num_total) - num_held - len(hit_blocks))
        # Hits on free blocks leave the free queue too, so they count against what is free.
        num_free_hits = sum(1 for block in hit_blocks if block.ref_cnt == 0)
        if num_new_blocks + num_free_hits > self.pool.num_free_blocks():
            return None

        if request is None:
            request = self._requests[request_id] = _RequestBlocks()
            if self.enable_prefix_caching:  # a request's lookup counts when it is admitted
                self._prefix_queries += len(token_ids)
                self._prefix_hits += len(hit_blocks) * bs
        # Touch before allocating, or the allocation could evict the very blocks just hit.
        self.pool.touch(hit_blocks)
        request.block_ids.extend(new_computed_blocks)
        # Verified hits carry exactly the hashes this request's chain would compute: no need to rehash.
        request.block_hashes.extend(block.block_hash for block in hit_blocks if block.block_hash is not None)
        new_blocks = self.pool.allocate(num_new_blocks)
        request.block_ids.extend(block.block_id for block in new_blocks)
        if self.enable_prefix_caching:
            self._register_full_blocks(request, token_ids, min(num_total, len(token_ids)))
        return [block.block_id for block in new_blocks]

    def free(self, request_id: str) -> None:
        """Drop the request's refs. Blocks reaching ref 0 go to the END of the free queue in REVERSE
        block-table order (a request's tail blocks are evicted before its head blocks); they keep their
        hash and stay hittable until reallocated. Unknown id: no-op."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self.pool.free(self.pool.blocks[block_id] for block_id in reversed(request.block_ids))

    def block_ids(self, request_id: str) -> tuple[int, ...]:
        """The request's block table (a snapshot); () if unknown."""
        request = self._requests.get(request_id)
        return tuple(request.block_ids) if request is not None else ()

    def num_free_blocks(self) -> int:
        """Blocks allocatable now (ref 0, cached or not)."""
        return self.pool.num_free_blocks()

    def usage(self) -> float:
        """Fraction of blocks in use (ref_cnt > 0)."""
        return self.pool.num_used_blocks() / self.num_blocks

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_blocks=self.num_blocks,
            num_used_blocks=self.pool.num_used_blocks(),
            num_free_blocks=self.pool.num_free_blocks(),
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
        )

    def reset_prefix_cache(self) -> bool:
        """Drop all hashes if no block is in use; False (nothing changed) otherwise."""
        return self.pool.reset_prefix_cache()

    def num_blocks_needed(self, num_tokens: int) -> int:
        """ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def _check_hits(self, hit_blocks: list[KVBlock], token_ids: Sequence[int], num_held: int) -> None:
        # Hits are only valid right after get_computed_blocks: an allocation in between may have
        # reclaimed them, and serving them then would mean attending to someone else's KV.
        if not self.enable_prefix_caching:
            raise ValueError("new_computed_blocks given while prefix caching is off")
        if num_held:
            raise ValueError("new_computed_blocks may only be passed on a request's first allocation")
        bs = self.block_size
        parent: int | None = None
        for i, block in enumerate(hit_blocks):
            if block.block_hash is None or not _holds(block, parent, token_ids[i * bs : (i + 1) * bs]):
                raise ValueError(f"block {block.block_id} no longer caches block {i} of these tokens")
            parent = block.block_hash

    def _register_full_blocks(
        self, request: _RequestBlocks, token_ids: Sequence[int], num_tokens: int
    ) -> None:
        bs = self.block_size
        num_full = num_tokens // bs
        start = len(request.block_hashes)
        if num_full <= start:
            return
        extend_block_hashes(request.block_hashes, token_ids, bs, num_full, self.hash_salt)
        for i in range(start, num_full):
            block = self.pool.blocks[request.block_ids[i]]
            parent = request.block_hashes[i - 1] if i else None
            # A hit block is registered already; a block whose hash another block holds stays unhashed.
            self.pool.cache_block(block, request.block_hashes[i], parent, token_ids[i * bs : (i + 1) * bs])


def _holds(block: KVBlock, parent_hash: int | None, token_ids: Sequence[int]) -> bool:
    """Whether a cached block was made from exactly these tokens after exactly this parent."""
    return block.parent_hash == parent_hash and block.token_ids == tuple(token_ids)
