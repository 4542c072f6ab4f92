"""Prefill/decode handoff, the engine's side: what a prefill worker holds for a decode worker.

A prefill-only request (`Request.prefill_only`) computes its prompt and samples its first token as
any request does. If that token does not end it, the engine hands it off instead of decoding:
`HandoffTable.hold` keeps the request's KV blocks (one extra reference each, so nothing evicts or
reuses them) under fresh random 16-byte keys, one per block of the prompt (the last one partial
when the prompt is not a whole number of blocks), and the request's output carries the `Handoff`:
the keys, the first token with its log-probabilities, and the seeded sampler's state after drawing
it. The KV connector's export serves those keys as it serves cached blocks, so every transport that
fetches blocks by key (the TCP data plane, the gRPC Fetch stream) moves a handoff with no special
case. The blocks are released when the decode worker says it has them (`release`) or when the
handoff's TTL passes (`expire`, called by the engine loop), whichever comes first; the keys are
random, so only whoever was given the handle can fetch them.

On the decode worker the same `Handoff` (from the request's handle) makes the request start with
the first token already generated and the sampler's state restored (worker/engine.py), and its
blocks are pulled before admission (worker/kv_prefetch.py) and loaded like any staged block
(worker/kv_connector.py); a block that cannot be pulled is computed there instead.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.keys import HASH_BYTES
from worker.block_manager import BlockManager

logger = logging.getLogger(__name__)

DEFAULT_HANDOFF_TTL_S = 30.0
"""How long a prefill worker holds a handoff's blocks when no decode worker releases them."""


@dataclass(frozen=True, slots=True)
class Handoff:
    """The handle of a prefilled prompt's KV (the engine's form of kvweave.v1.KVHandoff)."""

    handoff_id: str
    block_keys: tuple[bytes, ...]
    """One key per KV block of the prompt, in order."""
    num_tokens: int
    """Prompt tokens whose KV the blocks hold."""
    block_size: int
    first_token_id: int
    first_logprob: tuple[float, dict[int, float]] | None = None
    sampler_state: bytes = b""
    """The seeded sampler's generator state after the first token (empty: unseeded)."""
    ttl_s: float = DEFAULT_HANDOFF_TTL_S
    source_address: str = ""
    """gRPC address of the prefill worker (set by its service; the engine does not know it)."""
    source_worker_id: str = ""

    def check(self, num_prompt_tokens: int, block_size: int) -> str | None:
        """Why this handle cannot continue a prompt of `num_prompt_tokens` on an engine with
        `block_size` (None: it can)."""
        if self.num_tokens != num_prompt_tokens:
            return f"the handoff holds the KV of {self.num_tokens} tokens, the prompt has {num_prompt_tokens}"
        if self.block_size != block_size:
            return f"the handoff's blocks have {self.block_size} tokens, this worker's {block_size}"
        want = -(-num_prompt_tokens // block_size)
        if len(self.block_keys) != want:
            return f"the handoff has {len(self.block_keys)} block keys; a {num_prompt_tokens}-token prompt needs {want}"
        if any(len(k) != HASH_BYTES for k in self.block_keys):
            return f"handoff block keys must be {HASH_BYTES} bytes"
        if not self.handoff_id:
            return "the handoff has no id"
        if not self.source_address:
            return "the handoff has no source address"
        return None


@dataclass(slots=True)
class _Held:
    keys: tuple[bytes, ...]
    block_ids: list[int]
    expires: float


@dataclass
class HandoffStats:
    created: int = 0
    released: int = 0
    expired: int = 0


class HandoffTable:
    """Handoffs this (prefill) engine holds: their keys -> blocks, until released or expired.
    Engine thread only."""

    def __init__(self, block_manager: BlockManager, ttl_s: float = DEFAULT_HANDOFF_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl_s > 0:
            raise ValueError(f"the handoff TTL must be positive, got {ttl_s}")
        self.bm, self.ttl_s, self.clock = block_manager, ttl_s, clock
        self._held: dict[str, _Held] = {}
        self._blocks: dict[bytes, int] = {}
        self.stats = HandoffStats()

    def __len__(self) -> int:
        return len(self._held)

    @property
    def num_blocks(self) -> int:
        """Blocks held for handoffs now."""
        return len(self._blocks)

    def hold(self, block_ids: list[int], num_tokens: int, first_token_id: int,
             first_logprob: tuple[float, dict[int, float]] | None, sampler_state: bytes) -> Handoff:
        """Hold the blocks covering a prompt's `num_tokens` tokens for a decode worker."""
        bs = self.bm.block_size
        block_ids = list(block_ids[:-(-num_tokens // bs)])
        handoff_id = os.urandom(12).hex()
        keys = tuple(os.urandom(HASH_BYTES) for _ in block_ids)
        self.bm.hold(block_ids)
        self._held[handoff_id] = _Held(keys, block_ids, self.clock() + self.ttl_s)
        self._blocks.update(zip(keys, block_ids))
        self.stats.created += 1
        return Handoff(handoff_id, keys, num_tokens, bs, first_token_id, first_logprob, sampler_state, self.ttl_s)

    def block_id(self, key: bytes) -> int | None:
        """The device block a handoff key names (None: not a held handoff's)."""
        return self._blocks.get(key)

    def release(self, handoff_id: str) -> bool:
        """The decode worker has the KV: free the blocks. False when unknown (released or expired)."""
        held = self._held.pop(handoff_id, None)
        if held is None:
            return False
        self._drop(held)
        self.stats.released += 1
        return True

    def expire(self) -> int:
        """Release the handoffs whose TTL passed; returns how many."""
        now = self.clock()
        gone = [h for h, held in self._held.items() if held.expires <= now]
        for handoff_id in gone:
            logger.warning("handoff %s expired before a decode worker released it; its %d blocks are freed",
                           handoff_id, len(self._held[handoff_id].block_ids))
            self._drop(self._held.pop(handoff_id))
        self.stats.expired += len(gone)
        return len(gone)

    def release_all(self) -> None:
        for handoff_id in list(self._held):
            self._drop(self._held.pop(handoff_id))

    def _drop(self, held: _Held) -> None:
        for key in held.keys:
            self._blocks.pop(key, None)
        self.bm.release(held.block_ids)

