"""The shared-memory all-reduce of a tensor-parallel worker's CPU ranks (worker/shm_all_reduce.py),
with ranks as threads over one region (the engine's tests run it between processes): sums equal in
every rank, two in flight at once, the slot ring reused many times over, tensors too large for a
slot going through the fallback group, misuse refused, and a rank that never arrives reported
instead of waited for forever."""
from __future__ import annotations

import threading

import pytest
import torch

from worker.shm_all_reduce import ShmAllReduce, available, flags_numel, region_shape


class _Fallback:
    """Stands in for the gloo group: records what it was given (sums are the test's business)."""

    def __init__(self) -> None:
        self.given = []

    def allreduce(self, tensors):
        self.given.append(tensors[0])
        return self


def _ranks(size: int, max_numel: int, dtype=torch.float32, **kw):
    data = torch.zeros(region_shape(size, max_numel), dtype=dtype)
    flags = torch.zeros(flags_numel(size), dtype=torch.int64)
    fallback = _Fallback()
    return [ShmAllReduce(r, size, data, flags, fallback, **kw) for r in range(size)], fallback


def _run(ranks, body) -> list:
    out, errors = [None] * len(ranks), []

    def run(i):
        try:
            out[i] = body(i, ranks[i])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


def test_is_offered_on_x86_cpus_only():
    assert not available(torch.device("cuda"))


@pytest.mark.parametrize("size", [2, 3])
def test_every_rank_gets_the_same_sum_with_two_in_flight_many_times_over(size):
    ranks, _ = _ranks(size, 64)

    def body(r, group):
        got = []
        for step in range(25):  # 50 all-reduces: the 4-slot ring wraps a dozen times
            a = torch.full((8, 8), float(r + step), dtype=torch.float32)
            b = torch.arange(16, dtype=torch.float32) * (r + 1)
            wa, wb = group.allreduce([a]), group.allreduce([b])  # two in flight, as the token split keeps them
            wa.wait()
            wb.wait()
            got.append((a.clone(), b.clone()))
        return got

    results = _run(ranks, body)
    for step in range(25):
        want_a = torch.full((8, 8), float(sum(r + step for r in range(size))))
        want_b = torch.arange(16, dtype=torch.float32) * sum(r + 1 for r in range(size))
        for got in results:
            assert torch.equal(got[step][0], want_a) and torch.equal(got[step][1], want_b)


def test_bf16_sums_are_bit_identical_across_ranks():
    ranks, _ = _ranks(2, 1024, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1024, generator=g).to(torch.bfloat16) for _ in range(2)]

    def body(r, group):
        t = parts[r].clone()
        group.allreduce([t]).wait()
        return t

    a, b = _run(ranks, body)
    assert torch.equal(a, b) and torch.equal(a, parts[0] + parts[1])


def test_what_does_not_fit_a_slot_goes_through_the_fallback():
    (group, _), fallback = _ranks(2, 16)
    big, other = torch.zeros(17), torch.zeros(4, dtype=torch.float64)
    assert group.allreduce([big]) is fallback and group.allreduce([other]) is fallback
    assert fallback.given == [big, other] and group.started == 0


def test_misuse_is_refused():
    (group, _), _ = _ranks(2, 16)
    w1, w2 = group.allreduce([torch.zeros(4)]), group.allreduce([torch.zeros(4)])
    with pytest.raises(RuntimeError, match="a third"):
        group.allreduce([torch.zeros(4)])
    with pytest.raises(RuntimeError, match="out of order"):
        w2.wait()
    del w1


def test_a_rank_that_never_arrives_is_reported():
    (group, _), _ = _ranks(2, 16, timeout_s=0.3)
    with pytest.raises(RuntimeError, match="rank 1 did not reach all-reduce 0 within 0.3 s"):
        group.allreduce([torch.zeros(4)]).wait()
    (gone, _), _ = _ranks(2, 16, alive=lambda: False)
    with pytest.raises(RuntimeError, match="a tensor-parallel rank is gone"):
        gone.allreduce([torch.zeros(4)]).wait()
