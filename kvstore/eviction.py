"""Eviction policies: which entry a full tier gives up next.

A policy only orders keys; the tier owns the data. Hooks: `insert` (with the entry's recompute
cost), `access` (a hit), `remove`, and `victim` (the next key to evict, without removing it).
- `lru`: least recently used first.
- `cost_aware`: GreedyDual-Size-Frequency (Cherkasova 1998) with equal sizes: an entry's priority
  is `clock + hits * cost`, where cost is what recomputing it would take (a block deep in a long
  prompt attends to more context, so it costs more) and hits count its uses; the lowest priority
  goes first and the clock rises to the evicted priority, so entries that stopped being used age
  out however popular they once were.
"""
from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import ClassVar


class EvictionPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def insert(self, key: bytes, cost: float = 1.0) -> None: ...

    @abstractmethod
    def access(self, key: bytes) -> None: ...

    @abstractmethod
    def remove(self, key: bytes) -> None: ...

    @abstractmethod
    def victim(self) -> bytes | None:
        """The key to evict next (still held), or None when empty."""

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, cost: float = 1.0) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self) -> bytes | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)


class CostAwarePolicy(EvictionPolicy):
    name = "cost_aware"

    def __init__(self) -> None:
        self._clock = 0.0
        self._entries: dict[bytes, list] = {}  # key -> [priority, seq, key, cost, hits, live]
        self._heap: list[list] = []
        self._seq = itertools.count()

    def _push(self, key: bytes, cost: float, hits: int) -> None:
        old = self._entries.get(key)
        if old is not None:
            old[5] = False
        entry = [self._clock + hits * cost, next(self._seq), key, cost, hits, True]
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)

    def insert(self, key: bytes, cost: float = 1.0) -> None:
        if cost <= 0:
            raise ValueError(f"recompute cost must be positive, got {cost}")
        old = self._entries.get(key)
        self._push(key, cost, old[4] + 1 if old else 1)

    def access(self, key: bytes) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._push(key, old[3], old[4] + 1)

    def remove(self, key: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            old[5] = False

    def victim(self) -> bytes | None:
        while self._heap and not self._heap[0][5]:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        top = self._heap[0]
        self._clock = max(self._clock, top[0])
        return top[2]

    def __len__(self) -> int:
        return len(self._entries)


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (LRUPolicy, CostAwarePolicy)}


def make_eviction_policy(name: str) -> EvictionPolicy:
    cls = EVICTION_POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown eviction policy {name!r}; valid: {', '.join(EVICTION_POLICIES)}")
    return cls()
