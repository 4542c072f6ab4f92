"""The tier manager: a worker's host tiers (DRAM, then SSD) behind the device tier.

- Capacities per tier (`StoreConfig`: `dram_cache_gb`, `ssd_cache_gb`, `ssd_cache_dir`), one
  eviction policy per tier (`lru` or `cost_aware`, see kvstore/eviction.py).
- Write-through: the engine's KV connector copies every block it caches into the first host tier
  (`offload_many`, batched, off the engine thread), so a device eviction only drops a block;
  a full DRAM tier demotes its victim to SSD (the tier's `on_evict` hook); the last tier drops.
- Promotion: an entry read from SSD is also put in DRAM, so a popular entry climbs back.
- Events: every store and drop is recorded as a KV event (`BlockStored` / `BlockRemoved` with the
  tier as medium) for the worker to publish to the Redis index (`take_events`).
Thread-safe: the engine thread offloads and loads, prefetch threads read, the transfer service
exports; one lock orders the events with the tiers' state.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.codec import KVLayout
from kvstore.eviction import EVICTION_POLICIES, make_eviction_policy
from kvstore.events import BlockRemoved, BlockStored, BlockTouched
from kvstore.tier import KVTier, TierConfigError
from kvweave.cluster_secret import derive

logger = logging.getLogger(__name__)

GB = 2**30


@dataclass
class StoreConfig:
    dram_cache_gb: float | None = None
    """Host-memory tier size; None: no DRAM tier."""
    ssd_cache_gb: float | None = None
    """SSD tier size; None: no SSD tier (needs `ssd_cache_dir`)."""
    ssd_cache_dir: str | None = None
    eviction_policy: str = "lru"
    """lru | cost_aware, for the host tiers."""

    def __post_init__(self) -> None:
        for name in ("dram_cache_gb", "ssd_cache_gb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise TierConfigError(f"{name.replace('_', '-')} must be positive, got {value}")
        if self.ssd_cache_gb is not None and not self.ssd_cache_dir:
            raise TierConfigError("an SSD tier (ssd-cache-gb) needs ssd-cache-dir")
        if self.ssd_cache_dir and self.ssd_cache_gb is None:
            raise TierConfigError("ssd-cache-dir is set but ssd-cache-gb is not")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise TierConfigError(f"unknown eviction policy {self.eviction_policy!r}; "
                                  f"valid: {', '.join(EVICTION_POLICIES)}")

    @property
    def enabled(self) -> bool:
        return self.dram_cache_gb is not None or self.ssd_cache_gb is not None


class TierManager:
    def __init__(self, layout: KVLayout, config: StoreConfig) -> None:
        from kvstore.dram import DRAMTier
        from kvstore.ssd import SSDTier

        self.layout, self.config = layout, config
        self.tiers: list[KVTier] = []
        self._lock = threading.RLock()
        self._events: list = []
        if config.dram_cache_gb is not None:
            self.tiers.append(DRAMTier(layout, config.dram_cache_gb * GB, make_eviction_policy(config.eviction_policy)))
        if config.ssd_cache_gb is not None:
            self.tiers.append(SSDTier(layout, config.ssd_cache_gb * GB, config.ssd_cache_dir,
                                      make_eviction_policy(config.eviction_policy), mac_key=derive("ssd-mac")))
        for upper, lower in zip(self.tiers, self.tiers[1:]):
            upper.on_evict = self._demoter(upper, lower)
        for tier in self.tiers:
            tier.on_drop = self._dropper(tier)
            if len(tier):
                self._events.append(BlockStored(tier.keys(), None, tier.name))
        logger.info("KV store tiers: %s", ", ".join(f"{t.name} ({t.capacity} entries of {layout})" for t in self.tiers)
                    or "none")

    @property
    def mediums(self) -> list[str]:
        return [t.name for t in self.tiers]

    def tier(self, name: str) -> KVTier | None:
        return next((t for t in self.tiers if t.name == name), None)

    def _demoter(self, upper: KVTier, lower: KVTier):
        def demote(key: bytes, value: torch.Tensor) -> None:
            if lower.put(key, value):
                self._events.append(BlockStored([key], None, lower.name))
        return demote

    def _dropper(self, tier: KVTier):
        def dropped(key: bytes) -> None:
            self._events.append(BlockRemoved([key], tier.name))
        return dropped

    def offload(self, key: bytes, value: torch.Tensor, cost: float = 1.0) -> bool:
        """Keep an entry the device gives up (in the fastest host tier); False without tiers."""
        if not self.tiers:
            return False
        with self._lock:
            tier = self.tiers[0]
            if tier.contains(key):
                return True
            stored = tier.put(key, value, cost)
            if stored:
                self._events.append(BlockStored([key], None, tier.name))
            return stored

    def offload_many(self, keys: Sequence[bytes], values: Sequence[torch.Tensor],
                     costs: Sequence[float] | None = None) -> int:
        """`offload` of many entries with one batched put; returns how many the first tier holds."""
        if not self.tiers:
            return 0
        with self._lock:
            tier = self.tiers[0]
            fresh = [i for i, k in enumerate(keys) if not tier.contains(k)]
            if fresh:
                tier.put_many([keys[i] for i in fresh], [values[i] for i in fresh],
                              [costs[i] for i in fresh] if costs is not None else None)
                stored = [keys[i] for i in fresh if tier.contains(keys[i])]
                if stored:
                    self._events.append(BlockStored(stored, None, tier.name))
            return sum(tier.contains(k) for k in keys)

    def where(self, key: bytes) -> str | None:
        """The fastest tier holding `key`, or None."""
        for tier in self.tiers:
            if tier.contains(key):
                return tier.name
        return None

    def contains(self, key: bytes) -> bool:
        return any(t.contains(key) for t in self.tiers)

    def leading(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, some tier holds."""
        n = 0
        for key in keys:
            if not self.contains(key):
                break
            n += 1
        return n

    def load(self, key: bytes, out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str | None]:
        """(the entry, the tier it came from), or (None, None) when no tier holds a valid copy (a
        damaged copy is dropped and the next tier tried). An entry found below the first tier is
        promoted into it."""
        return self.load_many([key], None if out is None else [out])[0]

    def load_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor] | None = None
                  ) -> list[tuple[torch.Tensor | None, str | None]]:
        """`load` for many keys with one batched read per tier (an SSD tier coalesces the I/O of
        consecutive slots); entries found below the first tier are promoted into it."""
        result: list[tuple[torch.Tensor | None, str | None]] = [(None, None)] * len(keys)
        with self._lock:
            todo = list(range(len(keys)))
            for i, tier in enumerate(self.tiers):
                mine = [j for j in todo if tier.contains(keys[j])]
                if not mine:
                    continue
                values = tier.get_many([keys[j] for j in mine], [outs[j] for j in mine] if outs is not None else None)
                found = [(j, v) for j, v in zip(mine, values) if v is not None]
                for j, v in found:
                    result[j] = (v, tier.name)
                if found:
                    self._events.append(BlockTouched([keys[j] for j, _ in found], tier.name))
                    if i > 0:
                        first = self.tiers[0]
                        fresh = [(keys[j], v) for j, v in found if not first.contains(keys[j])]
                        if fresh and first.put_many([k for k, _ in fresh], [v for _, v in fresh]):
                            stored = [k for k, _ in fresh if first.contains(k)]
                            if stored:
                                self._events.append(BlockStored(stored, None, first.name))
                done = {j for j, _ in found}
                todo = [j for j in todo if j not in done]
                if not todo:
                    break
        return result

    def load_all(self, keys: Sequence[bytes]) -> list[torch.Tensor] | None:
        """Every entry of `keys` (a chunk-cache's, an embedding's), or None when any is missing or damaged."""
        if not all(self.contains(k) for k in keys):
            return None
        values = [value for value, _ in self.load_many(keys)]
        return None if any(v is None for v in values) else values

    def take_events(self) -> list:
        with self._lock:
            events, self._events = self._events, []
        return events

    def stats(self) -> dict[str, dict]:
        return {t.name: {"entries": len(t), "capacity": t.capacity, **vars(t.stats)} for t in self.tiers}

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
