"""The tier interface of the KV store, and the slot-based base of the host tiers (DRAM, SSD).

Every tier holds fixed-size entries of one `KVLayout` (for prefix blocks: one block of the paged
cache, all layers) under 16-byte keys (`KVKey.hash`), and answers the same small interface:
`contains`, `put`, `get`, `remove`, their batched forms, `keys`, `close`. A full tier evicts by
its `EvictionPolicy` and first hands the victim to `on_evict(key, value)` (the tier manager uses
that hook to demote the entry to the next tier; `value` is only valid during the call). `get`
returns a copy; a damaged entry is never returned: it is dropped and reported as a miss.

`SlotTier` implements all of it over `capacity` numbered slots; a subclass supplies the slot I/O
(`_write_slot`, `_read_slot`) and may rebuild its map at start (`_adopt`). All methods are
thread-safe (one lock per tier).
"""
from __future__ import annotations

import heapq
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from kvstore.codec import CorruptEntryError, KVLayout
from kvstore.eviction import EvictionPolicy, LRUPolicy

logger = logging.getLogger(__name__)

EvictHook = Callable[[bytes, torch.Tensor], None]
DropHook = Callable[[bytes], None]


class TierConfigError(ValueError):
    """A tier that cannot be built as configured (capacity, directory); says why."""


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    corrupt: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class KVTier(ABC):
    name: str = ""
    """"device", "dram" or "ssd": the medium reported to the index."""
    layout: KVLayout
    on_evict: EvictHook | None = None
    on_drop: DropHook | None = None
    """Called with the key of every entry the tier stops holding (evicted, damaged or removed)."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Entries this tier can hold."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def contains(self, key: bytes) -> bool: ...

    @abstractmethod
    def put(self, key: bytes, value: torch.Tensor, cost: float = 1.0) -> bool:
        """Store `value` (of `layout`) under `key`, evicting if full; an existing key is only touched.
        `cost`: what recomputing the entry would take (for cost-aware eviction). False when no room
        can be made."""

    @abstractmethod
    def get(self, key: bytes) -> torch.Tensor | None:
        """A copy of the entry, or None when absent or damaged."""

    @abstractmethod
    def remove(self, key: bytes) -> bool: ...

    @abstractmethod
    def keys(self) -> list[bytes]: ...

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def put_many(self, keys: Sequence[bytes], values: Sequence[torch.Tensor], costs: Sequence[float] | None = None) -> int:
        """`put` of each in turn; returns how many puts succeeded (a held key, only touched, counts).
        Every value is checked first: a wrong layout raises ValueError before anything is stored."""
        costs = self._check_batch(keys, values, costs)
        return sum(self.put(k, v, c) for k, v, c in zip(keys, values, costs))

    def get_many(self, keys: Sequence[bytes],
                 outs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """`get` of each in turn (into `outs[i]` when given)."""
        if outs is None:
            return [self.get(k) for k in keys]
        if len(outs) != len(keys):
            raise ValueError(f"get_many got {len(keys)} keys and {len(outs)} outs")
        for out in outs:
            if out is not None:
                self._check_value(out)
        return [self.get(k) if out is None else self.get(k, out) for k, out in zip(keys, outs)]

    def remove_many(self, keys: Iterable[bytes]) -> int:
        return sum(self.remove(k) for k in keys)

    def close(self) -> None:
        pass

    def _check_batch(self, keys: Sequence[bytes], values: Sequence[torch.Tensor],
                     costs: Sequence[float] | None) -> Sequence[float]:
        """The costs of a `put_many` (1.0 each by default), after checking lengths and every value's layout."""
        if len(values) != len(keys) or (costs is not None and len(costs) != len(keys)):
            raise ValueError(f"put_many got {len(keys)} keys, {len(values)} values"
                             f"{'' if costs is None else f' and {len(costs)} costs'}")
        for value in values:
            self._check_value(value)
        return [1.0] * len(keys) if costs is None else costs

    def _check_value(self, value: torch.Tensor) -> None:
        if value.dtype != self.layout.dtype or tuple(value.shape) != tuple(self.layout.shape):
            raise ValueError(f"{self.name} tier holds {self.layout}, got {KVLayout.of(value)}")


def capacity_entries(name: str, capacity_bytes: float, layout: KVLayout, slot_bytes: int | None = None) -> int:
    """Slots that fit in `capacity_bytes`; TierConfigError when not even one does."""
    slot_bytes = slot_bytes or layout.nbytes
    if not capacity_bytes > 0:
        raise TierConfigError(f"{name} cache capacity must be positive, got {capacity_bytes}")
    n = int(capacity_bytes // slot_bytes)
    if n < 1:
        raise TierConfigError(f"{name} cache capacity {capacity_bytes:.0f} bytes holds no entry "
                              f"(one entry of {layout} takes {slot_bytes} bytes)")
    return n


class SlotTier(KVTier):
    """Entries in `capacity` fixed slots; free slots are reused lowest first (no allocation per put)."""

    def __init__(self, name: str, layout: KVLayout, capacity: int, policy: EvictionPolicy | None = None) -> None:
        if capacity < 1:
            raise TierConfigError(f"{name} tier needs a capacity of at least one entry, got {capacity}")
        self.name, self.layout = name, layout
        self._capacity = capacity
        self.policy = policy if policy is not None else LRUPolicy()  # an empty policy is falsy (__len__)
        self.on_evict: EvictHook | None = None
        self.on_drop: DropHook | None = None
        self.stats = TierStats()
        self._slots: dict[bytes, int] = {}
        self._free: list[int] = list(range(capacity))  # a min-heap: the lowest free slot is reused first
        self._lock = threading.RLock()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._slots)

    @abstractmethod
    def _write_slot(self, slot: int, key: bytes, value: torch.Tensor) -> None:
        """Write the entry to `slot` (atomically with respect to later reads)."""

    @abstractmethod
    def _read_slot(self, slot: int, key: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        """The entry in `slot` (into `out` when given); raises CorruptEntryError when damaged."""

    def _erase_slot(self, slot: int) -> None:
        """Forget the entry in `slot` (so that a restart does not bring it back)."""

    def _adopt(self, entries: Iterable[tuple[bytes, int]]) -> None:
        """Register the (key, slot) entries found at start, oldest first (slot I/O already verified)."""
        for key, slot in entries:
            self._slots[key] = slot
            self.policy.insert(key)
        taken = set(self._slots.values())
        self._free = [s for s in range(self._capacity) if s not in taken]
        heapq.heapify(self._free)

    def contains(self, key: bytes) -> bool:
        return key in self._slots

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        slots = self._slots
        return [k in slots for k in keys]

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._slots)

    def put(self, key: bytes, value: torch.Tensor, cost: float = 1.0) -> bool:
        self._check_value(value)
        with self._lock:
            if key in self._slots:
                self.policy.access(key)
                return True
            if not self._free and not self._evict_one():
                return False
            slot = heapq.heappop(self._free)
            try:
                self._write_slot(slot, key, value)
            except BaseException:
                heapq.heappush(self._free, slot)
                raise
            self._slots[key] = slot
            self.policy.insert(key, cost)
            self.stats.puts += 1
            self.stats.bytes_written += self.layout.nbytes
            return True

    def get(self, key: bytes, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The entry (a copy, or written into `out`), or None when absent or damaged."""
        if out is not None:
            self._check_value(out)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                self.stats.misses += 1
                return None
            try:
                value = self._read_slot(slot, key, out)
            except CorruptEntryError as e:
                logger.warning("%s tier: dropping damaged entry %s: %s", self.name, key.hex(), e)
                self.stats.corrupt += 1
                self.stats.misses += 1
                self._drop(key)
                return None
            self.policy.access(key)
            self.stats.hits += 1
            self.stats.bytes_read += self.layout.nbytes
            return value

    def remove(self, key: bytes) -> bool:
        with self._lock:
            if key not in self._slots:
                return False
            self._drop(key)
            return True

    def _drop(self, key: bytes, erase: bool = True) -> None:
        slot = self._slots.pop(key)
        self.policy.remove(key)
        if erase:
            self._erase_slot(slot)
        heapq.heappush(self._free, slot)
        if self.on_drop is not None:
            self.on_drop(key)

    def _evict_one(self) -> bool:
        victim = self.policy.victim()
        if victim is None:
            return False
        slot = self._slots[victim]
        if self.on_evict is not None:
            try:
                value = self._read_slot(slot, victim)
            except CorruptEntryError as e:
                logger.warning("%s tier: evicting damaged entry %s: %s", self.name, victim.hex(), e)
                self.stats.corrupt += 1
                value = None
            if value is not None:
                try:
                    self.on_evict(victim, value)
                except Exception:  # demotion is best effort; eviction must go on
                    logger.exception("%s tier: eviction hook failed for %s", self.name, victim.hex())
        # No erase: `put` overwrites the slot at once (were it to crash first, the old entry would
        # come back at restart, still valid for its own key).
        self._drop(victim, erase=False)
        self.stats.evictions += 1
        return True
