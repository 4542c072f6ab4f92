"""Block manager: exact block ids, ref counts, free-queue order, prefix-cache hits and KV events."""
from __future__ import annotations

from kvstore.keys import hash_blocks
from worker.block_manager import BlockManager, BlockRemoved, BlockStored

EXTRA = b"tiny\x1ftenant"
PREFIX = list(range(100, 108))  # two full blocks of 4


def hashes(tokens: list[int], block_size: int = 4) -> list[bytes]:
    return hash_blocks(tokens, block_size, EXTRA)


def ref_cnts(bm: BlockManager) -> list[int]:
    return [b.ref_cnt for b in bm.blocks]


def admit(bm: BlockManager, req_id: str, tokens: list[int]) -> int:
    """Prefix lookup + first allocation, as the scheduler does it; returns the hit tokens."""
    hits, num_hit_tokens = bm.get_computed_blocks(req_id, tokens, EXTRA)
    assert bm.allocate_slots(req_id, len(tokens), hits)
    return num_hit_tokens


def run_prefill(bm: BlockManager, req_id: str, tokens: list[int]) -> int:
    num_hit_tokens = admit(bm, req_id, tokens)
    bm.cache_full_blocks(req_id, tokens, len(tokens), EXTRA)
    return num_hit_tokens


def snapshot(bm: BlockManager) -> tuple:
    return (bm.free_queue.block_ids(), ref_cnts(bm), [b.block_hash for b in bm.blocks], dict(bm.cached_blocks),
            {r: bm.get_block_table(r) for r in bm.req_blocks}, dict(bm.req_num_cached), list(bm.events))


def test_allocate_takes_blocks_from_the_head_of_the_free_queue() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.free_queue.block_ids() == list(range(8))
    assert bm.get_computed_blocks("a", list(range(10)), EXTRA) == ([], 0)
    assert bm.allocate_slots("a", 10)
    assert bm.get_block_table("a") == [0, 1, 2]
    assert ref_cnts(bm) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert bm.free_queue.block_ids() == [3, 4, 5, 6, 7]
    assert bm.num_free_blocks == 5
    assert bm.usage == 3 / 8
    assert bm.cached_blocks == {} and bm.take_events() == []  # nothing is cached before it is computed


def test_growing_a_request_adds_a_block_only_when_the_last_one_is_full() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate_slots("a", 10)
    assert bm.allocate_slots("a", 12)
    assert bm.get_block_table("a") == [0, 1, 2]
    assert bm.allocate_slots("a", 13)
    assert bm.get_block_table("a") == [0, 1, 2, 3]
    assert bm.free_queue.block_ids() == [4, 5, 6, 7]


def test_caching_full_blocks_sets_hashes_and_emits_block_stored() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 110))
    h = hashes(tokens + [110, 111])
    assert bm.allocate_slots("a", 10)
    bm.cache_full_blocks("a", tokens, 7, EXTRA)  # a first chunk of 7: one full block
    assert bm.take_events() == [BlockStored([h[0]], None)]
    bm.cache_full_blocks("a", tokens, 10, EXTRA)
    assert bm.take_events() == [BlockStored([h[1]], h[0])]
    assert bm.take_events() == []
    assert [b.block_hash for b in bm.blocks[:3]] == [h[0], h[1], None]
    assert bm.cached_blocks == {h[0]: bm.blocks[0], h[1]: bm.blocks[1]}
    # Two decoded tokens fill block 2.
    tokens += [110, 111]
    assert bm.allocate_slots("a", 12)
    bm.cache_full_blocks("a", tokens, 12, EXTRA)
    assert bm.take_events() == [BlockStored([h[2]], h[1])]
    assert bm.blocks[2].block_hash == h[2]


def test_two_requests_share_a_cached_prefix() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert run_prefill(bm, "a", PREFIX + [1, 2, 3]) == 0
    assert bm.get_block_table("a") == [0, 1, 2]
    bm.take_events()
    hits, num_hit_tokens = bm.get_computed_blocks("b", PREFIX + [4, 5], EXTRA)
    assert [b.block_id for b in hits] == [0, 1]
    assert num_hit_tokens == 8
    assert bm.allocate_slots("b", 10, hits)
    assert bm.get_block_table("b") == [0, 1, 3]
    assert ref_cnts(bm) == [2, 2, 1, 1, 0, 0, 0, 0]
    assert bm.free_queue.block_ids() == [4, 5, 6, 7]
    bm.cache_full_blocks("b", PREFIX + [4, 5], 10, EXTRA)
    assert bm.take_events() == []  # the shared blocks were already stored


def test_free_releases_tail_first_and_keeps_hashes() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, "a", PREFIX + [1, 2, 3])
    run_prefill(bm, "b", PREFIX + [4, 5])
    h = hashes(PREFIX)
    bm.free("a")
    assert ref_cnts(bm) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert bm.free_queue.block_ids() == [4, 5, 6, 7, 2]  # shared blocks are still held by b
    bm.free("b")
    assert ref_cnts(bm) == [0] * 8
    assert bm.free_queue.block_ids() == [4, 5, 6, 7, 2, 3, 1, 0]
    assert bm.get_block_table("a") == bm.get_block_table("b") == []
    assert bm.cached_blocks == {h[0]: bm.blocks[0], h[1]: bm.blocks[1]}
    assert bm.take_events() == [BlockStored(h, None)]  # freeing removes nothing from the cache
    bm.free("a")  # freeing an unknown (or already freed) request is a no-op
    assert bm.free_queue.block_ids() == [4, 5, 6, 7, 2, 3, 1, 0]


def test_a_hit_on_a_free_block_takes_it_out_of_the_free_queue() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, "a", PREFIX + [1, 2, 3])
    bm.free("a")
    assert bm.free_queue.block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert run_prefill(bm, "b", PREFIX + [9]) == 8
    assert bm.get_block_table("b") == [0, 1, 3]
    assert ref_cnts(bm) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert bm.free_queue.block_ids() == [4, 5, 6, 7, 2]


def test_eviction_takes_the_lru_block_and_drops_its_hash() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, "a", PREFIX + [1, 2, 3])
    run_prefill(bm, "b", PREFIX + [4, 5])
    bm.free("a")
    bm.free("b")
    h = hashes(PREFIX)
    bm.take_events()
    # An unrelated 20-token request takes the five unhashed blocks at the head.
    assert admit(bm, "c", list(range(200, 220))) == 0
    assert bm.get_block_table("c") == [4, 5, 6, 7, 2]
    assert bm.take_events() == []
    assert bm.free_queue.block_ids() == [3, 1, 0]
    # The next one evicts block 1 (the prefix's tail) before block 0 (its head).
    assert bm.allocate_slots("d", 8)
    assert bm.get_block_table("d") == [3, 1]
    assert bm.take_events() == [BlockRemoved([h[1]])]
    assert bm.blocks[1].block_hash is None and bm.blocks[1].ref_cnt == 1
    assert bm.cached_blocks == {h[0]: bm.blocks[0]}
    assert bm.free_queue.block_ids() == [0]
    # Only the head is still a hit.
    hits, num_hit_tokens = bm.get_computed_blocks("e", PREFIX + [7], EXTRA)
    assert ([b.block_id for b in hits], num_hit_tokens) == ([0], 4)


def test_a_prefix_hit_never_covers_the_whole_prompt() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, "a", PREFIX + [1, 2, 3, 4])  # three full blocks cached
    for req_id, tokens, expected in [("b", PREFIX, 4), ("c", PREFIX + [1], 8), ("d", PREFIX + [1, 2, 3, 4], 8),
                                     ("e", PREFIX + [1, 2, 3, 4, 5], 12), ("f", PREFIX[:4], 0)]:
        hits, num_hit_tokens = bm.get_computed_blocks(req_id, tokens, EXTRA)
        assert num_hit_tokens == expected, tokens
        assert num_hit_tokens < len(tokens)
        assert [b.block_id for b in hits] == list(range(expected // 4))


def test_hits_need_the_same_extra_keys_and_an_unbroken_chain() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, "a", PREFIX + [1, 2, 3, 4, 5])
    assert bm.get_computed_blocks("b", PREFIX + [1, 2, 3, 4, 5], b"other-tenant") == ([], 0)
    changed = [0] + PREFIX[1:] + [1, 2, 3, 4, 5]  # first block differs: later blocks cannot hit either
    assert bm.get_computed_blocks("c", changed, EXTRA) == ([], 0)


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    tokens = list(range(100, 113))  # 13 tokens: three full blocks and one partial
    run_prefill(bm, "a", tokens)
    bm.free("a")
    assert bm.free_queue.block_ids() == [3, 2, 1, 0]
    # 12 tokens hit blocks 0-2, which are free; 17 tokens need two more blocks but only block 3 is left.
    hits, num_hit_tokens = bm.get_computed_blocks("b", tokens[:12] + [1, 2, 3, 4, 5], EXTRA)
    assert num_hit_tokens == 12
    before = snapshot(bm)
    assert not bm.allocate_slots("b", 17, hits)
    assert snapshot(bm) == before
    # 13 tokens need exactly one more block: it fits.
    assert bm.allocate_slots("b", 13, hits)
    assert bm.get_block_table("b") == [0, 1, 2, 3]
    assert bm.free_queue.block_ids() == []
    # Growing a running request past the pool fails without side effects too.
    before = snapshot(bm)
    assert not bm.allocate_slots("b", 17)
    assert snapshot(bm) == before


def test_identical_blocks_computed_twice_are_cached_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    # Both requests are admitted before either has computed anything: no hits.
    assert admit(bm, "a", PREFIX + [1]) == 0
    assert admit(bm, "b", PREFIX + [1]) == 0
    bm.cache_full_blocks("a", PREFIX + [1], 9, EXTRA)
    bm.cache_full_blocks("b", PREFIX + [1], 9, EXTRA)
    h = hashes(PREFIX)
    assert bm.take_events() == [BlockStored(h, None)]
    assert bm.cached_blocks == {h[0]: bm.blocks[0], h[1]: bm.blocks[1]}
    assert [b.block_hash for b in bm.blocks[3:5]] == [None, None]  # b's copies stay anonymous
    bm.free("b")
    assert bm.free_queue.block_ids() == [6, 7, 5, 4, 3]


def test_block_stored_event_names_the_parent_of_its_first_block() -> None:
    """A consumer (the router's index) attaches the stored blocks under `parent_hash`."""
    bm = BlockManager(num_blocks=8, block_size=4)
    long = PREFIX + list(range(108, 116))  # four full blocks
    h = hashes(long)
    # b is admitted before a's blocks are cached, so it computes copies of blocks 0 and 1.
    assert admit(bm, "a", PREFIX + [1]) == 0
    assert admit(bm, "b", long + [1]) == 0
    bm.cache_full_blocks("a", PREFIX + [1], 9, EXTRA)
    assert bm.take_events() == [BlockStored([h[0], h[1]], None)]
    bm.cache_full_blocks("b", long + [1], 16, EXTRA)
    # Blocks 0 and 1 are already cached; 2 and 3 are new and their parent is block 1.
    assert bm.take_events() == [BlockStored([h[2], h[3]], h[1])]


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    run_prefill(bm, "a", PREFIX + [1])
    assert bm.cached_blocks == {} and bm.take_events() == []
    bm.free("a")
    assert bm.get_computed_blocks("b", PREFIX + [1], EXTRA) == ([], 0)


def test_reset_prefix_cache_forgets_every_hash() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, "a", PREFIX + [1])
    bm.free("a")
    bm.take_events()
    bm.reset_prefix_cache()
    assert bm.take_events() == [BlockRemoved(hashes(PREFIX))]
    assert bm.cached_blocks == {}
    assert all(b.block_hash is None for b in bm.blocks)
    assert bm.get_computed_blocks("b", PREFIX + [1], EXTRA) == ([], 0)
    assert bm.num_free_blocks == 8


def test_hashes_known_before_admission_are_used_not_recomputed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, "a", PREFIX + [1, 2, 3])
    known = hash_blocks(PREFIX, 4, EXTRA)
    hits, n = bm.get_computed_blocks("b", PREFIX + [4, 5], EXTRA, known=known)
    assert n == 8 and bm.req_hashes["b"] == known
    # The chain continues from the known hashes: a wrong known hash misses (it was trusted, not redone).
    hits, n = bm.get_computed_blocks("c", PREFIX + [4, 5], EXTRA, known=[b"\0" * 16])
    assert n == 0 and bm.req_hashes["c"][0] == b"\0" * 16 and len(bm.req_hashes["c"]) == 2
