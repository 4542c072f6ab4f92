"""The one block-hash chain of kvweave.

A full block of `block_size` tokens is identified by
    hash(parent_hash, token_ids, extra_keys)
so a block hash names the whole prefix that ends with that block (as in vLLM's prefix cache).
`extra_keys` carries what must separate caches that hold the same tokens: the model, the tenant
namespace (tenants never share KV), adapters. The worker's block manager, the KV store and the
router all hash with these functions, so a hash means the same thing in every process.

With a cluster secret the extra keys end with a salt derived from it (`encode_extra_keys`), so
hashes are keyed: the index in Redis and the data plane name blocks by values nobody outside the
cluster can link to a text.

Hashes are 16-byte BLAKE2b digests: stable across processes and Python versions (unlike
`hash()`), and cheap (~1 us per block).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType
from urllib.parse import quote, unquote

import numpy as np

BlockHash = NewType("BlockHash", bytes)

HASH_BYTES = 16
# Parent of the first block: a fixed seed, so an empty prefix hashes the same everywhere.
ROOT_HASH = BlockHash(hashlib.blake2b(b"kvweave-root", digest_size=HASH_BYTES).digest())


def encode_extra_keys(extra_keys: Sequence[str | int], salt: bytes = b"") -> bytes:
    """Stable byte form of extra keys (model name, tenant namespace, ...). `salt`: the cluster's
    secret hash salt (`kvweave.cluster_secret.hash_salt()`, b"" in an open cluster); with it every
    block and chunk hash is keyed, so nobody without the secret can compute the hash of a guessed
    text (BLAKE2b has no length extension, so a secret suffix keys it as a prefix would)."""
    encoded = "\x1f".join(str(k) for k in extra_keys).encode()
    return encoded + b"\x1e" + salt if salt else encoded


class ExtraKeysCache:
    """`encode_extra_keys((model, namespace), salt)` per namespace, for the `max_entries` namespaces
    used last (an LRU: a router sees any number of tenants, and must not keep one entry each forever)."""

    def __init__(self, model: str, salt: bytes = b"", max_entries: int = 4096) -> None:
        assert max_entries > 0
        self.model, self.salt, self.max_entries = model, salt, max_entries
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, namespace: str) -> bytes:
        extra = self._entries.get(namespace)
        if extra is not None:
            self._entries.move_to_end(namespace)
            return extra
        extra = self._entries[namespace] = encode_extra_keys((self.model, namespace), self.salt)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return extra


_EMPTY_HASHER = hashlib.blake2b(digest_size=HASH_BYTES)
"""hash_blocks copies it (never updates it): a fresh blake2b of the key size."""


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash of one block given its parent's hash, its token ids and encoded extra keys."""
    h = hashlib.blake2b(parent or ROOT_HASH, digest_size=HASH_BYTES)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra:
        h.update(b"\x00")
        h.update(extra)
    return BlockHash(h.digest())


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra: bytes = b"",
    parent: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids`, from block `start_block` on.

    `parent` is the hash of block `start_block - 1` (None when starting at block 0), which lets a
    caller extend a chain it already has without rehashing it. Same values as chaining
    `hash_block`, computed over one buffer (this runs per request on the router's hot path).
    """
    assert block_size > 0
    if isinstance(token_ids, (list, tuple)):  # the router's case: array() packs a list ~1.3x faster than numpy
        buf = array("q", token_ids).tobytes()
    else:
        buf = np.asarray(token_ids, dtype=np.int64).tobytes()
    step = block_size * 8
    suffix = b"\x00" + extra if extra else b""
    hashes: list[BlockHash] = []
    append, fresh = hashes.append, _EMPTY_HASHER.copy
    parent = parent or ROOT_HASH
    # One update over parent + block + suffix (the same bytes as hash_block's updates, ~1.5x
    # faster), the blocks sliced up front (~1.3x), and a copy of an empty hasher instead of the
    # constructor's keyword parsing (~1.2x): this runs per request on the router's hot path.
    for block in [buf[i:i + step] for i in range(start_block * step, len(buf) - step + 1, step)]:
        h = fresh()
        h.update(parent + block + suffix)
        parent = h.digest()
        append(parent)
    return hashes


def hash_chunk(token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash of a reusable chunk (position independent: no parent)."""
    h = hashlib.blake2b(b"kvweave-chunk", digest_size=HASH_BYTES)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra:
        h.update(b"\x00")
        h.update(extra)
    return BlockHash(h.digest())


def chunk_hash(token_ids: Sequence[int], extra: bytes = b"", context: Sequence[int] = ()) -> BlockHash:
    """The key of a chunk's cache: its tokens, the extra keys, and the tokens it was computed after."""
    if not context:
        return hash_chunk(token_ids, extra)
    return hash_chunk(token_ids, extra + b"\x00after\x00" + hash_chunk(context, extra))


def chunk_block_keys(key: bytes, num_tokens: int, block_size: int) -> list[bytes]:
    """Keys of the entries holding a chunk of `num_tokens` tokens."""
    n = -(-num_tokens // block_size)
    return [hashlib.blake2b(key + i.to_bytes(4, "little"), digest_size=HASH_BYTES).digest() for i in range(n)]


def embedding_key(image_hash: bytes, extra: bytes = b"") -> BlockHash:
    """The key of an image's encoder output (its embeddings): the image's content hash, the extra
    keys (model, namespace, cluster salt). Its own seed keeps it apart from every block and chunk key."""
    h = hashlib.blake2b(b"kvweave-embedding", digest_size=HASH_BYTES)
    h.update(image_hash)
    if extra:
        h.update(b"\x00")
        h.update(extra)
    return BlockHash(h.digest())


def embedding_entry_keys(key: bytes, num_values: int, entry_values: int) -> list[bytes]:
    """Keys of the entries holding an embedding of `num_values` values, `entry_values` per entry
    (the same derivation as a chunk's entries, from a key no chunk can have)."""
    return chunk_block_keys(key, num_values, entry_values)


KINDS = ("block", "chunk", "embedding")


@dataclass(frozen=True, slots=True)
class KVKey:
    """The identity of one stored entry: a prefix block, a reusable chunk or an image's embedding.

    `hash` already commits to the model and the namespace (they are the extra keys of the chain,
    see `encode_extra_keys`) and to the kind (chunks and embeddings hash with their own seeds),
    so the 16-byte `hash` alone is what tiers, the index and transfers use as the entry's id; the other fields
    name the entry for people and for checks. `str(key)` is the stable string form
    `<kind>:<model>:<namespace>:<hex hash>` (model and namespace percent-encoded).
    """

    model: str
    namespace: str
    kind: str
    hash: BlockHash

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"KV key kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.hash, bytes) or len(self.hash) != HASH_BYTES:
            raise ValueError(f"KV key hash must be {HASH_BYTES} bytes")

    def __str__(self) -> str:
        return f"{self.kind}:{quote(self.model, safe='')}:{quote(self.namespace, safe='')}:{self.hash.hex()}"

    @classmethod
    def parse(cls, text: str) -> "KVKey":
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError(f"not a KV key: {text!r} (expected kind:model:namespace:hash)")
        kind, model, namespace, hexhash = parts
        try:
            digest = bytes.fromhex(hexhash)
        except ValueError as e:
            raise ValueError(f"not a KV key: {text!r} (bad hash)") from e
        return cls(unquote(model), unquote(namespace), kind, BlockHash(digest))

    @property
    def extra(self) -> bytes:
        """The encoded extra keys of this key's hash chain, without the cluster's salt (add it with
        `encode_extra_keys((model, namespace), salt)` in a cluster with a secret)."""
        return encode_extra_keys((self.model, self.namespace))
