"""KVCacheManager on a pool of TEN blocks of 4 tokens: exact block ids, eviction order, prefix hits."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.kvcache import hashing
from kiln.kvcache.hashing import hash_block_tokens
from kiln.kvcache.manager import KVCacheManager, KVCacheStats

BS = 4
PROMPT = [11, 12, 13, 14, 21, 22, 23, 24, 31]  # two full blocks and one token


def _manager(**kwargs) -> KVCacheManager:
    return KVCacheManager(10, BS, **kwargs)


def _prefill(m: KVCacheManager, rid: str, tokens: list[int]) -> list[int] | None:
    """What the scheduler does for a new request: look up hits, then allocate the rest."""
    hits, num_hit_tokens = m.get_computed_blocks(tokens)
    return m.allocate_slots(rid, tokens, 0, len(tokens) - num_hit_tokens, hits)


def _state(m: KVCacheManager) -> tuple:
    return (
        m.pool.free_queue(),
        [(b.ref_cnt, b.block_hash, b.token_ids) for b in m.pool.blocks],
        {rid: m.block_ids(rid) for rid in ("a", "b", "x")},
        m.stats(),
    )


# --- hashing ---------------------------------------------------------------------------------------


def test_hash_is_stable_across_processes() -> None:
    code = "from kiln.kvcache.hashing import hash_block_tokens as h; print(h(h(None, [1, 2, 3, 4]), [5, 6], 's'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 4]), [5, 6], "s")


def test_hash_chains_parent_tokens_and_salt() -> None:
    root = hash_block_tokens(None, [1, 2, 3, 4])
    assert root == hash_block_tokens(None, (1, 2, 3, 4))
    assert root != hash_block_tokens(None, [1, 2, 3, 5])
    assert root != hash_block_tokens(None, [1, 2, 3, 4], "tenant")
    other_root = hash_block_tokens(None, [0, 0, 0, 0])
    assert hash_block_tokens(root, [5, 6, 7, 8]) != hash_block_tokens(other_root, [5, 6, 7, 8])
    assert hash_block_tokens(root, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])


def test_iter_and_extend_block_hashes_agree() -> None:
    tokens = list(range(10))
    chain = list(hashing.iter_block_hashes(tokens, BS))
    assert chain == [hash_block_tokens(None, tokens[:4]), hash_block_tokens(chain[0], tokens[4:8])]
    assert list(hashing.iter_block_hashes(tokens, BS, max_blocks=1)) == chain[:1]
    extended = chain[:1]
    hashing.extend_block_hashes(extended, tokens, BS, 2)
    assert extended == chain
    with pytest.raises(ValueError):
        hashing.extend_block_hashes(extended, tokens, BS, 3)


# --- allocation -----------------------------------------------------------------------------------


def test_allocation_returns_exact_block_ids_and_grows_on_decode() -> None:
    m = _manager()
    assert m.allocate_slots("a", PROMPT, 0, 9) == [0, 1, 2]
    assert m.allocate_slots("b", [1, 2, 3, 4, 5], 0, 5) == [3, 4]
    tokens = [*PROMPT, 32, 33, 34]
    assert m.allocate_slots("a", tokens[:10], 9, 1) == []  # 10 tokens fit 3 blocks
    assert m.allocate_slots("a", tokens, 11, 1) == []  # 12 tokens: block 2 now full
    assert m.allocate_slots("a", [*tokens, 41], 12, 1) == [5]
    assert m.block_ids("a") == (0, 1, 2, 5)
    assert m.block_ids("b") == (3, 4)
    assert m.num_free_blocks() == 4
    assert m.usage() == pytest.approx(0.6)


def test_allocate_validates_its_arguments() -> None:
    m = _manager()
    with pytest.raises(ValueError):
        m.allocate_slots("a", PROMPT, 0, 10)  # more tokens than token_ids holds
    with pytest.raises(ValueError):
        m.allocate_slots("a", PROMPT, 4, 1)  # computed tokens in blocks it does not have
    with pytest.raises(ValueError):
        m.allocate_slots("a", PROMPT, 0, -1)
    assert m.block_ids("a") == () and m.num_free_blocks() == 10


def test_allocate_returning_none_leaves_state_unchanged() -> None:
    m = _manager()
    assert m.allocate_slots("a", list(range(32)), 0, 32) == [0, 1, 2, 3, 4, 5, 6, 7]
    before = _state(m)
    assert m.allocate_slots("b", list(range(100, 109)), 0, 9) is None  # needs 3, 2 free
    assert m.allocate_slots("a", list(range(41)), 32, 9) is None  # needs 3 more
    assert _state(m) == before
    assert m.allocate_slots("b", list(range(100, 108)), 0, 8) == [8, 9]


def test_hits_on_free_blocks_count_against_the_free_pool() -> None:
    m = _manager()
    _prefill(m, "a", PROMPT)  # blocks 0, 1 (full, hashed), 2
    m.free("a")
    assert m.allocate_slots("x", list(range(100, 128)), 0, 28) == [3, 4, 5, 6, 7, 8, 9]
    assert m.pool.free_queue() == [2, 1, 0]
    # 13 tokens: 2 hit blocks (both free) + 2 new ones = 4 blocks out of the 3 free.
    longer = [*PROMPT, 32, 33, 34, 35]
    hits, num_hit_tokens = m.get_computed_blocks(longer)
    assert (hits, num_hit_tokens) == ([0, 1], 8)
    before = _state(m)
    assert m.allocate_slots("b", longer, 0, 5, hits) is None
    assert _state(m) == before
    # 12 tokens: 2 hit blocks + 1 new = 3 blocks; the new one is 2, the only non-hit free block.
    assert m.allocate_slots("b", longer[:12], 0, 4, hits) == [2]
    assert m.block_ids("b") == (0, 1, 2)
    assert m.num_free_blocks() == 0


# --- freeing and eviction order ------------------------------------------------------------------


def test_free_returns_tail_blocks_first_and_they_are_evicted_first() -> None:
    m = _manager()
    assert _prefill(m, "a", PROMPT) == [0, 1, 2]
    m.free("a")
    assert m.pool.free_queue() == [3, 4, 5, 6, 7, 8, 9, 2, 1, 0]
    assert m.get_computed_blocks(PROMPT) == ([0, 1], 8)  # freed but still cached
    assert m.allocate_slots("x", list(range(100, 128)), 0, 28) == [3, 4, 5, 6, 7, 8, 9]
    assert m.allocate_slots("y", [7], 0, 1) == [2]  # a's partial tail block
    assert m.allocate_slots("z", [8], 0, 1) == [1]  # a's second block: its hash is reclaimed
    assert m.get_computed_blocks(PROMPT) == ([0], 4)  # a's head block survives longest
    assert m.pool.lookup(hashing.hash_block_tokens(None, PROMPT[:4])) is m.pool.blocks[0]


def test_free_of_unknown_request_is_a_noop() -> None:
    m = _manager()
    _prefill(m, "a", PROMPT)
    before = _state(m)
    m.free("nobody")
    assert _state(m) == before
    m.free("a")
    after = _state(m)
    m.free("a")  # twice: the second is unknown too
    assert _state(m) == after
    assert m.block_ids("a") == ()


# --- prefix hits ----------------------------------------------------------------------------------


def test_hit_touches_free_blocks_and_takes_refs() -> None:
    m = _manager()
    _prefill(m, "a", PROMPT)
    m.free("a")
    hits, num_hit_tokens = m.get_computed_blocks(PROMPT)
    assert (hits, num_hit_tokens) == ([0, 1], 8)
    assert m.pool.blocks[0].ref_cnt == 0  # get_computed_blocks takes no refs
    assert m.allocate_slots("b", PROMPT, 0, 1, hits) == [3]
    assert m.block_ids("b") == (0, 1, 3)
    assert [m.pool.blocks[i].ref_cnt for i in (0, 1, 3)] == [1, 1, 1]
    assert m.pool.free_queue() == [4, 5, 6, 7, 8, 9, 2]


def test_hits_never_cover_the_last_token() -> None:
    m = _manager()
    m.allocate_slots("a", PROMPT[:8], 0, 8)  # two full, hashed blocks
    assert m.get_computed_blocks(PROMPT[:8]) == ([0], 4)  # the whole prompt cached: still compute token 8
    assert m.get_computed_blocks(PROMPT) == ([0, 1], 8)
    assert m.get_computed_blocks(PROMPT[:4]) == ([], 0)
    assert m.get_computed_blocks(PROMPT[:1]) == ([], 0)
    assert m.get_computed_blocks([]) == ([], 0)


def test_same_block_tokens_after_a_different_prefix_is_not_a_hit() -> None:
    m = _manager()
    _prefill(m, "a", PROMPT)  # [11..14] then [21..24]
    _prefill(m, "b", [0, 0, 0, 0, 9, 9, 9, 9, 9])  # caches [0, 0, 0, 0] as block 3
    # [0,0,0,0] hits b's head; [21..24] is cached only after [11..14], so the chain stops there.
    assert m.get_computed_blocks([0, 0, 0, 0, 21, 22, 23, 24, 31]) == ([3], 4)


def test_hash_collision_is_caught_by_token_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "hash_block_tokens", lambda parent, tokens, salt="": 7)
    m = _manager()
    _prefill(m, "a", [1, 2, 3, 4, 5])
    assert m.pool.lookup(7) is m.pool.blocks[0]
    assert m.get_computed_blocks([9, 9, 9, 9, 5]) == ([], 0)  # same hash, other tokens: a miss
    assert m.get_computed_blocks([1, 2, 3, 4, 6]) == ([0], 4)  # same tokens: a real hit
    assert _prefill(m, "b", [9, 9, 9, 9, 5]) == [2, 3]  # computed afresh, not aliased to block 0
    assert m.block_ids("b") == (2, 3)
    with pytest.raises(ValueError):  # a forged hit is refused too
        m.allocate_slots("x", [9, 9, 9, 9, 5], 0, 1, [0])


def test_stale_hits_are_refused_and_change_nothing() -> None:
    m = _manager()
    _prefill(m, "a", PROMPT)
    m.free("a")
    hits, _ = m.get_computed_blocks(PROMPT)
    m.allocate_slots("x", list(range(100, 140)), 0, 40)  # reclaims every block, hits included
    m.free("x")
    before = _state(m)
    with pytest.raises(ValueError):
        m.allocate_slots("b", PROMPT, 0, 1, hits)
    assert _state(m) == before


def test_hits_only_on_first_allocation() -> None:
    m = _manager()
    _prefill(m, "a", PROMPT)
    m.allocate_slots("b", [5], 0, 1)
    with pytest.raises(ValueError):
        m.allocate_slots("b", PROMPT, 1, 0, [0])


def test_two_requests_sharing_a_prefix_share_blocks_by_ref_count() -> None:
    m = _manager()
    _prefill(m, "a", PROMPT)  # [0, 1, 2]
    other = [*PROMPT[:8], 99, 98]
    assert _prefill(m, "b", other) == [3]
    assert m.block_ids("b") == (0, 1, 3)
    assert [b.ref_cnt for b in m.pool.blocks[:4]] == [2, 2, 1, 1]
    assert m.stats().num_used_blocks == 4
    m.free("a")
    assert [b.ref_cnt for b in m.pool.blocks[:4]] == [1, 1, 0, 1]
    assert m.pool.free_queue() == [4, 5, 6, 7, 8, 9, 2]
    m.free("b")
    assert m.pool.free_queue() == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]
    assert m.num_free_blocks() == 10


def test_reset_prefix_cache() -> None:
    m = _manager()
    _prefill(m, "a", PROMPT)
    assert not m.reset_prefix_cache()  # a is running
    assert m.get_computed_blocks(PROMPT) == ([0, 1], 8)
    m.free("a")
    order = m.pool.free_queue()
    assert m.reset_prefix_cache()
    assert m.get_computed_blocks(PROMPT) == ([], 0)
    assert m.pool.num_cached_blocks() == 0
    assert m.pool.free_queue() == order


def test_stats_count_queries_and_hits() -> None:
    m = _manager()
    assert m.stats() == KVCacheStats(10, 0, 10, 0, 0)
    _prefill(m, "a", PROMPT)  # 9 queried, 0 hit
    _prefill(m, "b", [*PROMPT[:4], 7, 7])  # 6 queried, 4 hit
    stats = m.stats()
    assert stats == KVCacheStats(
        num_blocks=10, num_used_blocks=4, num_free_blocks=6, prefix_queries=15, prefix_hits=4
    )
    assert stats.prefix_hit_rate == pytest.approx(4 / 15)
    assert m.allocate_slots("x", list(range(100)), 0, 100) is None  # a failed allocation counts nothing
    assert m.get_computed_blocks(PROMPT) == ([0, 1], 8)  # nor does a lookup before admission
    assert m.stats() == stats


def test_disabled_prefix_caching() -> None:
    m = _manager(enable_prefix_caching=False)
    _prefill(m, "a", PROMPT)
    m.free("a")
    assert m.get_computed_blocks(PROMPT) == ([], 0)
    assert m.pool.num_cached_blocks() == 0
    assert m.stats().prefix_queries == 0
    assert _prefill(m, "b", PROMPT) == [3, 4, 5]
    with pytest.raises(ValueError):
        m.allocate_slots("c", PROMPT, 0, 1, [0])


def test_salt_separates_caches() -> None:
    m = _manager(hash_salt="tenant-a")
    _prefill(m, "a", PROMPT)
    salted = KVCacheManager(10, BS, hash_salt="tenant-b")
    salted.pool = m.pool  # same blocks, another salt: nothing is shared
    assert salted.get_computed_blocks(PROMPT) == ([], 0)
    assert m.get_computed_blocks(PROMPT) == ([0, 1], 8)


def test_each_block_is_hashed_once_over_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = hashing.hash_block_tokens

    def counting(parent, tokens, salt=""):
        calls.append(tuple(tokens))
        return real(parent, tokens, salt)

    monkeypatch.setattr(hashing, "hash_block_tokens", counting)
    m = _manager()
    tokens = list(range(5))
    m.allocate_slots("a", tokens, 0, 5)
    for step in range(11):  # decode to 16 tokens
        tokens.append(100 + step)
        m.allocate_slots("a", tokens, len(tokens) - 1, 1)
    assert calls == [(0, 1, 2, 3), (4, 100, 101, 102), (103, 104, 105, 106), (107, 108, 109, 110)]
    assert m.block_ids("a") == (0, 1, 2, 3)


def test_num_blocks_needed() -> None:
    m = _manager()
    assert [m.num_blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# --- property: no leaks ---------------------------------------------------------------------------

_operations = st.lists(
    st.tuples(
        st.sampled_from(["new", "decode", "free"]),
        st.integers(0, 5),
        st.lists(st.integers(0, 2), max_size=14),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(_operations)
def test_random_allocate_free_sequences_never_leak_blocks(operations) -> None:
    m = _manager()
    tokens: dict[str, list[int]] = {}
    for op, slot, prompt in operations:
        rid = f"r{slot}"
        if op == "new" and rid not in tokens and prompt:
            if _prefill(m, rid, prompt) is not None:
                tokens[rid] = list(prompt)
        elif op == "decode" and rid in tokens:
            grown = [*tokens[rid], slot]
            if m.allocate_slots(rid, grown, len(grown) - 1, 1) is not None:
                tokens[rid] = grown
        elif op == "free":
            m.free(rid)
            tokens.pop(rid, None)
        # Invariants after every step: tables cover their tokens, refs match tables, free == ref 0.
        refs = [0] * m.num_blocks
        for rid_, toks in tokens.items():
            table = m.block_ids(rid_)
            assert len(table) == m.num_blocks_needed(len(toks))
            for block_id in table:
                refs[block_id] += 1
        assert [b.ref_cnt for b in m.pool.blocks] == refs
        assert sorted(m.pool.free_queue()) == [i for i, r in enumerate(refs) if r == 0]
    for rid in list(tokens):
        m.free(rid)
    assert m.num_free_blocks() == m.num_blocks
    assert m.stats().num_used_blocks == 0
    assert all(b.ref_cnt == 0 for b in m.pool.blocks)


def test_unknown_tokens_get_slots_but_their_block_is_hashed_only_once_known() -> None:
    m = _manager()
    prompt = [11, 12, 13, 14, 21, 22, 23]  # one full block, three tokens of the second
    assert m.allocate_slots("a", prompt, 0, 7) == [0, 1]
    # Overlapped steps: token 8 (position 7) was sampled on the device, its id not yet known here.
    assert m.allocate_slots("a", prompt, 7, 1, num_unknown_tokens=1) == []
    assert m.pool.blocks[1].block_hash is None  # full now, but one of its ids is unknown
    with pytest.raises(ValueError):
        m.allocate_slots("a", prompt, 8, 1, num_unknown_tokens=1)  # 2 past the known ids, 1 unknown
    known = [*prompt, 24]
    assert m.allocate_slots("a", known, 8, 1, num_unknown_tokens=1) == [2]
    assert m.pool.blocks[1].token_ids == (21, 22, 23, 24)  # registered once its ids are all known
    assert m.get_computed_blocks([*known, 5]) == ([0, 1], 8)
