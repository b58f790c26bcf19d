"""BlockPool: ref counts, free-queue (eviction) order, touch, hash registration and lazy reclamation."""

from __future__ import annotations

import pytest

from kiln.kvcache.block_pool import BlockPool


def _ids(blocks) -> list[int]:
    return [block.block_id for block in blocks]


def test_initial_free_queue_is_every_block_in_order() -> None:
    pool = BlockPool(10)
    assert pool.free_queue() == list(range(10))
    assert pool.num_free_blocks() == 10
    assert pool.num_used_blocks() == 0


def test_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_takes_from_front_with_one_ref() -> None:
    pool = BlockPool(10)
    blocks = pool.allocate(3)
    assert _ids(blocks) == [0, 1, 2]
    assert [block.ref_cnt for block in blocks] == [1, 1, 1]
    assert _ids(pool.allocate(2)) == [3, 4]
    assert pool.free_queue() == [5, 6, 7, 8, 9]
    assert pool.num_used_blocks() == 5


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(10)
    pool.allocate(8)
    with pytest.raises(ValueError):
        pool.allocate(3)
    assert pool.free_queue() == [8, 9]


def test_free_appends_in_given_order_at_ref_zero_only() -> None:
    pool = BlockPool(10)
    a, b, c = pool.allocate(3)
    pool.touch([b])  # a second owner of b
    assert b.ref_cnt == 2
    pool.free([c, b, a])
    assert pool.free_queue() == [3, 4, 5, 6, 7, 8, 9, 2, 0]
    assert b.ref_cnt == 1
    pool.free([b])
    assert pool.free_queue()[-1] == 1
    # Freed blocks are allocated again only after every block that was free before them.
    assert _ids(pool.allocate(8)) == [3, 4, 5, 6, 7, 8, 9, 2]


def test_free_more_than_referenced_raises() -> None:
    pool = BlockPool(10)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError):
        pool.free([block])


def test_touch_takes_a_free_block_out_of_the_free_queue() -> None:
    pool = BlockPool(10)
    pool.touch([pool.blocks[5]])
    assert pool.blocks[5].ref_cnt == 1
    assert 5 not in pool.free_queue()
    assert pool.num_free_blocks() == 9
    assert _ids(pool.allocate(9)) == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_cache_block_and_lookup() -> None:
    pool = BlockPool(10)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, 111, None, [1, 2, 3, 4])
    assert pool.lookup(111) is a
    assert a.token_ids == (1, 2, 3, 4) and a.parent_hash is None
    # One block per hash: a second block with the same hash stays unhashed.
    assert not pool.cache_block(b, 111, None, [1, 2, 3, 4])
    assert b.block_hash is None and pool.lookup(111) is a
    # A block keeps its first hash.
    assert not pool.cache_block(a, 222, None, [5, 6, 7, 8])
    assert pool.lookup(222) is None and a.block_hash == 111
    assert pool.num_cached_blocks() == 1


def test_freed_block_stays_hittable_until_reallocated() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, 111, None, [1, 2])
    pool.free([a, b])
    assert pool.lookup(111) is a  # free but still cached
    assert _ids(pool.allocate(1)) == [0]  # reclaiming it evicts the hash (lazily, now)
    assert pool.lookup(111) is None
    assert a.block_hash is None and a.token_ids is None and a.parent_hash is None
    assert pool.num_cached_blocks() == 0


def test_reset_prefix_cache_only_when_nothing_in_use() -> None:
    pool = BlockPool(10)
    a, b = pool.allocate(2)
    pool.cache_block(a, 111, None, [1, 2])
    pool.cache_block(b, 222, 111, [3, 4])
    assert not pool.reset_prefix_cache()
    assert pool.lookup(111) is a
    pool.free([b, a])
    order = pool.free_queue()
    assert pool.reset_prefix_cache()
    assert pool.lookup(111) is None and pool.lookup(222) is None
    assert a.block_hash is None and b.token_ids is None
    assert pool.free_queue() == order
