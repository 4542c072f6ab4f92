"""Prefill/decode handoff, the engine's side: what a prefill worker holds for a decode worker.

A prefill-only request (`Request.prefill_only`) gets a handoff as soon as it is submitted
(`HandoffTable.open`): fresh random 16-byte keys, one per block of the prompt (the last one partial
when the prompt is not a whole number of blocks), announced at once in an early, incomplete handle
(`Handoff.complete` false), so that the decode worker can pull each block while the rest is still
being computed. After every step the keys of the blocks computed so far name them (`progress`;
a preemption takes them back). The request computes its prompt and samples its first token as any
request does; if that token does not end it, the engine hands it off instead of decoding:
`hold` keeps the request's blocks (one extra reference each, so nothing evicts or reuses them)
and the request's last output carries the complete `Handoff`: the same keys, the first token with
its log-probabilities, and the seeded sampler's state after drawing it. The KV connector's export
serves those keys as it serves cached blocks, so every transport that fetches blocks by key (the
TCP data plane, the gRPC Fetch stream) moves a handoff with no special case; a held handoff's
blocks never change, so they are also read outside the engine thread (`pin`), without waiting for
the step in progress. The blocks are released when the decode worker says it has them (`release`)
or when the handoff's TTL passes (`expire`, called by the engine loop), whichever comes first;
the keys are random, so only whoever was given the handle can fetch them.

On the decode worker the same `Handoff` (from the request's handle) makes the request start with
the first token already generated and the sampler's state restored (worker/engine.py), and its
blocks are pulled before admission (worker/kv_prefetch.py) and loaded like any staged block
(worker/kv_connector.py); a block that cannot be pulled is computed there instead.
"""
from __future__ import annotations

import logging
import math
import os
import threading
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
    complete: bool = True
    """False on the early handle a prefill worker sends as it starts: its blocks become fetchable as
    they are computed, and the first token is not known yet."""

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
        if not self.complete:
            return "the handoff is not complete (its first token is not known yet)"
        return None


@dataclass(slots=True)
class _Entry:
    handoff_id: str
    keys: tuple[bytes, ...]
    block_ids: list[int]
    """The blocks the keys name so far (open: the computed ones; held: all)."""
    held: bool = False
    expires: float = math.inf
    pins: int = 0
    """Readers copying the blocks outside the engine thread."""
    dropped: bool = False
    """Released or expired while pinned: freed when the last reader is done."""


@dataclass
class HandoffStats:
    created: int = 0
    released: int = 0
    expired: int = 0


class HandoffTable:
    """Handoffs this (prefill) engine made: open ones (their request still computing) and held ones
    (their KV kept for a decode worker until released or expired). Engine thread, except `pin`,
    `unpin` and `block_id` lookups, which any thread may call (a lock guards the key map)."""

    def __init__(self, block_manager: BlockManager, ttl_s: float = DEFAULT_HANDOFF_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl_s > 0:
            raise ValueError(f"the handoff TTL must be positive, got {ttl_s}")
        self.bm, self.ttl_s, self.clock = block_manager, ttl_s, clock
        self._open: dict[str, _Entry] = {}
        """Request id -> its handoff, until held or cancelled."""
        self._held: dict[str, _Entry] = {}
        """Handoff id -> a held handoff."""
        self._blocks: dict[bytes, tuple[_Entry, int]] = {}
        self._dropped: dict[str, _Entry] = {}
        """Released or expired while pinned (their keys already unmapped)."""
        self._deferred: list[_Entry] = []
        """Dropped, then unpinned: their blocks are released by the engine thread (`expire`)."""
        self._lock = threading.Lock()
        self.stats = HandoffStats()

    def __len__(self) -> int:
        """Handoffs held now."""
        return len(self._held)

    @property
    def num_blocks(self) -> int:
        """Blocks held for decode workers now."""
        return sum(len(e.block_ids) for e in list(self._held.values()))

    def open(self, req_id: str, num_tokens: int) -> Handoff:
        """The early, incomplete handle of a prefill-only request just submitted."""
        n = -(-num_tokens // self.bm.block_size)
        entry = _Entry(os.urandom(12).hex(), tuple(os.urandom(HASH_BYTES) for _ in range(n)), [])
        self._open[req_id] = entry
        return Handoff(entry.handoff_id, entry.keys, num_tokens, self.bm.block_size, 0, ttl_s=self.ttl_s,
                       complete=False)

    def open_requests(self) -> list[str]:
        return list(self._open)

    def progress(self, req_id: str, block_ids: list[int], num_ready: int) -> None:
        """After a step: the first `num_ready` blocks of the request (`block_ids`, its block table)
        are computed; only their keys name blocks (fewer than before after a preemption)."""
        entry = self._open[req_id]
        num_ready = min(num_ready, len(entry.keys), len(block_ids))
        if entry.block_ids == block_ids[:num_ready]:
            return
        with self._lock:
            for key in entry.keys[num_ready:len(entry.block_ids)]:
                self._blocks.pop(key, None)
            entry.block_ids = list(block_ids[:num_ready])
            self._blocks.update((k, (entry, b)) for k, b in zip(entry.keys, entry.block_ids))

    def cancel(self, req_id: str) -> None:
        """The request ended without a handoff (its first token ended it, or it was aborted)."""
        entry = self._open.pop(req_id, None)
        if entry is not None:
            with self._lock:
                self._unmap(entry)

    def hold(self, req_id: str, block_ids: list[int], num_tokens: int, first_token_id: int,
             first_logprob: tuple[float, dict[int, float]] | None, sampler_state: bytes) -> Handoff:
        """Hold the blocks covering a prompt's `num_tokens` tokens for a decode worker (under the
        keys its early handle named, when it has one)."""
        bs = self.bm.block_size
        block_ids = list(block_ids[:-(-num_tokens // bs)])
        entry = self._open.pop(req_id, None)
        if entry is None or len(entry.keys) != len(block_ids):
            entry = _Entry(os.urandom(12).hex(), tuple(os.urandom(HASH_BYTES) for _ in block_ids), [])
        self.bm.hold(block_ids)
        with self._lock:
            self._unmap(entry)
            entry.block_ids, entry.held, entry.expires = block_ids, True, self.clock() + self.ttl_s
            self._blocks.update((k, (entry, b)) for k, b in zip(entry.keys, block_ids))
        self._held[entry.handoff_id] = entry
        self.stats.created += 1
        return Handoff(entry.handoff_id, entry.keys, num_tokens, bs, first_token_id, first_logprob, sampler_state,
                       self.ttl_s)

    def block_id(self, key: bytes) -> int | None:
        """The device block a handoff key names now (None: not one of an open or held handoff's, or
        one whose TTL passed though `expire` has not run yet)."""
        found = self._blocks.get(key)
        return None if found is None or self._past_ttl(found[0]) else found[1]

    def _past_ttl(self, entry) -> bool:
        return entry.held and entry.expires <= self.clock()

    def pin(self, keys: list[bytes]) -> tuple[str, list[int]] | None:
        """Any thread: the blocks of the leading run of `keys` that belong to one held handoff, kept
        from being released until `unpin(handoff_id)`; None when keys[0] is not a held handoff's."""
        with self._lock:
            first = self._blocks.get(keys[0]) if keys else None
            if first is None or not first[0].held or self._past_ttl(first[0]):
                return None
            entry = first[0]
            blocks = []
            for key in keys:
                found = self._blocks.get(key)
                if found is None or found[0] is not entry:
                    break
                blocks.append(found[1])
            entry.pins += 1
            return entry.handoff_id, blocks

    def unpin(self, handoff_id: str) -> None:
        with self._lock:
            entry = self._held.get(handoff_id) or self._dropped.get(handoff_id)
            if entry is None:
                return
            entry.pins -= 1
            if entry.pins == 0 and entry.dropped:
                self._deferred.append(self._dropped.pop(handoff_id))

    def release(self, handoff_id: str) -> bool:
        """The decode worker has the KV: free the blocks. False when unknown (released or expired)."""
        entry = self._held.pop(handoff_id, None)
        if entry is None:
            return False
        self._drop(entry)
        self.stats.released += 1
        return True

    def expire(self) -> int:
        """Release the handoffs whose TTL passed (and those whose last reader just finished);
        returns how many expired."""
        with self._lock:
            deferred, self._deferred = self._deferred, []
        for entry in deferred:
            self.bm.release(entry.block_ids)
        now = self.clock()
        gone = [h for h, entry in self._held.items() if entry.expires <= now]
        for handoff_id in gone:
            logger.warning("handoff %s expired before a decode worker released it; its %d blocks are freed",
                           handoff_id, len(self._held[handoff_id].block_ids))
            self._drop(self._held.pop(handoff_id))
        self.stats.expired += len(gone)
        return len(gone)

    def release_all(self) -> None:
        for handoff_id in list(self._held):
            self._drop(self._held.pop(handoff_id))

    def _drop(self, entry: _Entry) -> None:
        with self._lock:
            self._unmap(entry)
            if entry.pins:
                entry.dropped = True
                self._dropped[entry.handoff_id] = entry
                return
        self.bm.release(entry.block_ids)

    def _unmap(self, entry: _Entry) -> None:
        for key in entry.keys:
            found = self._blocks.get(key)
            if found is not None and found[0] is entry:
                del self._blocks[key]
