"""The block-hash chain: what a block hash depends on, and what it does not."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore.keys import HASH_BYTES, ROOT_HASH, encode_extra_keys, hash_block, hash_blocks, hash_chunk

TOKENS = list(range(100, 126))  # 26 tokens: 6 full blocks of 4 and a partial one of 2
EXTRA = encode_extra_keys(("tiny-llama", "tenant-a"))


def test_chain_is_deterministic_and_one_hash_per_full_block() -> None:
    hashes = hash_blocks(TOKENS, 4, EXTRA)
    assert hashes == hash_blocks(list(TOKENS), 4, EXTRA)
    assert len(hashes) == 6
    assert len(set(hashes)) == 6
    assert all(isinstance(h, bytes) and len(h) == HASH_BYTES for h in hashes)


def test_golden_values_are_stable_across_processes_and_versions() -> None:
    # These strings are Redis index keys and SSD file names: changing the format orphans every
    # cache already written, so a change here must be deliberate.
    assert ROOT_HASH.hex() == "0f1ff22e267d9df6418f0cc8eba588c4"
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)[1].hex() == "a194eb3384e87f8de1a4ee69c5938be7"
    assert hash_chunk([1, 2, 3]).hex() == "14aa9af76169f937d10466d186efd43a"


def test_token_container_type_does_not_matter() -> None:
    expected = hash_blocks(TOKENS, 4, EXTRA)
    assert hash_blocks(tuple(TOKENS), 4, EXTRA) == expected
    assert hash_blocks(np.array(TOKENS, dtype=np.int32), 4, EXTRA) == expected


def test_first_block_is_chained_to_the_root() -> None:
    block = TOKENS[:4]
    assert hash_block(None, block, EXTRA) == hash_block(ROOT_HASH, block, EXTRA)
    assert hash_blocks(TOKENS, 4, EXTRA)[0] == hash_block(None, block, EXTRA)


def test_each_hash_chains_its_parent() -> None:
    hashes = hash_blocks(TOKENS, 4, EXTRA)
    for i in range(1, len(hashes)):
        assert hashes[i] == hash_block(hashes[i - 1], TOKENS[4 * i:4 * i + 4], EXTRA)


def test_hash_depends_on_parent() -> None:
    block = TOKENS[4:8]
    a, b = hash_block(None, TOKENS[:4]), hash_block(None, [9, 9, 9, 9])
    assert hash_block(a, block) != hash_block(b, block)
    assert hash_block(a, block) != hash_block(None, block)


def test_changing_a_token_changes_its_block_and_every_later_one_only() -> None:
    hashes = hash_blocks(TOKENS, 4, EXTRA)
    changed = list(TOKENS)
    changed[9] += 1  # inside block 2
    other = hash_blocks(changed, 4, EXTRA)
    assert other[:2] == hashes[:2]
    assert all(x != y for x, y in zip(other[2:], hashes[2:]))


def test_token_order_matters() -> None:
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [2, 1, 3, 4])


@pytest.mark.parametrize("other_extra", [
    b"",
    encode_extra_keys(("tiny-llama", "tenant-b")),
    encode_extra_keys(("other-model", "tenant-a")),
    encode_extra_keys(("tiny-llama",)),
    encode_extra_keys(("tiny-llama", "tenant-a", "adapter")),
])
def test_extra_keys_separate_caches(other_extra: bytes) -> None:
    assert other_extra != EXTRA
    assert hash_blocks(TOKENS, 4, other_extra)[0] != hash_blocks(TOKENS, 4, EXTRA)[0]
    assert hash_chunk(TOKENS, other_extra) != hash_chunk(TOKENS, EXTRA)


def test_encode_extra_keys_is_stable_and_ordered() -> None:
    assert encode_extra_keys(("m", 7)) == encode_extra_keys(["m", "7"])
    assert encode_extra_keys(("a", "b")) != encode_extra_keys(("b", "a"))
    assert encode_extra_keys(("ab", "")) != encode_extra_keys(("a", "b"))


@pytest.mark.parametrize("split_block", [0, 1, 3, 6])
def test_extending_a_chain_equals_hashing_from_scratch(split_block: int) -> None:
    full = hash_blocks(TOKENS, 4, EXTRA)
    head = hash_blocks(TOKENS[:4 * split_block], 4, EXTRA)
    parent = head[-1] if head else None
    tail = hash_blocks(TOKENS, 4, EXTRA, parent=parent, start_block=split_block)
    assert head + tail == full
    assert len(tail) == 6 - split_block


def test_partial_blocks_are_not_hashed() -> None:
    assert hash_blocks(TOKENS[:3], 4) == []
    assert hash_blocks(TOKENS[:11], 4) == hash_blocks(TOKENS[:8], 4)
    assert len(hash_blocks(TOKENS[:12], 4)) == 3
    # The partial tail does not leak into the full blocks' hashes either.
    assert hash_blocks(TOKENS[:8] + [1, 2, 3], 4) == hash_blocks(TOKENS[:8] + [7], 4)


def test_block_size_matters() -> None:
    assert hash_blocks(TOKENS[:8], 8)[0] != hash_blocks(TOKENS[:8], 4)[1]


def test_chunk_hash_is_position_independent() -> None:
    chunk = [300, 301, 302, 303, 304]
    assert hash_chunk(chunk, EXTRA) == hash_chunk(list(chunk), EXTRA)
    # The same chunk found after different prefixes is the same chunk-cache ...
    doc_a, doc_b = [1, 2, 3] + chunk, [9, 9, 9, 9, 9, 9, 9] + chunk
    assert hash_chunk(doc_a[3:], EXTRA) == hash_chunk(doc_b[7:], EXTRA)
    # ... whereas a block hash names the whole prefix.
    assert hash_blocks(doc_a + [0], 4)[1] != hash_blocks(doc_b[4:] + [0], 4)[1]


def test_chunk_hash_differs_from_block_hash_and_depends_on_content() -> None:
    chunk = [300, 301, 302, 303]
    assert hash_chunk(chunk) != hash_block(None, chunk)
    assert hash_chunk(chunk) != hash_chunk(chunk[:3])
    assert hash_chunk(chunk) != hash_chunk(chunk + [0])
    assert len(hash_chunk(chunk)) == HASH_BYTES
