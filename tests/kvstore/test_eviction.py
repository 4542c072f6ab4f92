"""Eviction policies: exact victim orders on scripted sequences."""
from __future__ import annotations

import pytest

from kvstore.eviction import CostAwarePolicy, EvictionPolicy, LRUPolicy, make_eviction_policy


def evict(policy: EvictionPolicy, n: int | None = None) -> list[str]:
    """Evict `n` keys (all when None), as a tier does: victim, then remove."""
    out = []
    while len(policy) and (n is None or len(out) < n):
        victim, held = policy.victim(), len(policy)
        assert policy.victim() == victim and len(policy) == held  # asking changes nothing
        policy.remove(victim)
        out.append(victim.decode())
    return out


def test_lru_order():
    p = LRUPolicy()
    assert p.victim() is None and len(p) == 0
    for k in "abcde":
        p.insert(k.encode())
    p.access(b"a")
    p.access(b"c")
    p.access(b"zz")  # unknown: ignored
    p.insert(b"b")  # a second insert counts as a use
    p.remove(b"d")
    p.remove(b"zz")
    assert len(p) == 4
    assert evict(p, 1) == ["e"]
    p.insert(b"f")
    assert evict(p) == ["a", "c", "b", "f"]
    assert p.victim() is None


def test_cost_aware_orders_by_cost_times_hits():
    p = CostAwarePolicy()
    p.insert(b"a", 1.0)
    p.insert(b"b", 5.0)
    p.insert(b"c", 2.0)
    p.insert(b"d", 2.0)
    for _ in range(5):
        p.access(b"a")  # 6 hits x 1 > 5
    p.access(b"d")  # 2 hits x 2 = 4 > 2
    assert evict(p) == ["c", "d", "b", "a"]


def test_cost_aware_ages_out_an_entry_popular_long_ago():
    # 'a' earns priority 6 early; then a stream of cheap one-hit entries passes through 3 slots.
    # Each eviction raises the clock to the victim's priority, so newcomers enter ever higher and
    # 'a', no longer used, goes once the clock has caught up with it.
    p = CostAwarePolicy()
    p.insert(b"a", 3.0)
    p.access(b"a")
    p.insert(b"b")
    p.insert(b"c")
    order = []
    for k in "defghijklm":
        order += evict(p, 1)
        p.insert(k.encode())
    assert order == ["b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]
    assert evict(p, 1) == ["a"]  # clock 5: a (6) ties with l (5 + 1) and is older


def test_cost_aware_a_hit_after_aging_renews_an_entry():
    p = CostAwarePolicy()
    p.insert(b"a", 3.0)
    p.access(b"a")
    p.insert(b"b")
    p.insert(b"c")
    for k in "defghijkl":
        evict(p, 1)
        p.insert(k.encode())
    p.access(b"a")  # 3 hits x 3 on top of the clock: safe again
    assert "a" not in evict(p, 2)


def test_cost_aware_refuses_a_non_positive_cost():
    with pytest.raises(ValueError, match="positive"):
        CostAwarePolicy().insert(b"a", 0.0)


def test_make_eviction_policy():
    assert isinstance(make_eviction_policy("lru"), LRUPolicy)
    assert isinstance(make_eviction_policy("cost_aware"), CostAwarePolicy)
    with pytest.raises(ValueError, match="lru, cost_aware"):
        make_eviction_policy("fifo")
