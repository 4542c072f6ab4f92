"""CPU cores a worker process runs on (Linux affinity), as vLLM's and SGLang's CPU backends bind their
threads (VLLM_CPU_OMP_THREADS_BIND, SGLANG_CPU_OMP_THREADS_BIND).

Why: on a shared CPU machine the scheduler moves a busy engine thread between cores and time-shares
it with the router, Redis and the other workers' threads while a core sits idle. A measured case
(SmolLM2-135M, one decode worker of one thread, 5 streams over a 1,700-token context, AMD EPYC Zen 3,
2 cores): a decode step took 128 ms in the cluster against 105 ms for the engine alone; with the
worker bound to one core and the rest to the other, 113 ms.

A core list is "0-3", "0,2,4" or "0-1,6-7", within the cores this process may use.
"""
from __future__ import annotations

import os
from collections.abc import Sequence


def parse_cores(spec: str) -> list[int]:
    """The cores of `spec` ("0-3", "0,2", "0-1,6"), sorted; ValueError naming what is wrong, including
    cores this process may not use."""
    cores: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU core list {spec!r}: expected e.g. 0-3 or 0,2,4") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU core range {part!r} in {spec!r}")
        cores.update(range(first, last + 1))
    allowed = available_cores()
    if not cores <= set(allowed):
        raise ValueError(f"CPU cores {format_cores(sorted(cores - set(allowed)))} are not available to this "
                         f"process (it may use {format_cores(allowed)})")
    return sorted(cores)


def format_cores(cores: Sequence[int]) -> str:
    """`cores` as a list of ranges ("0-3,6"), the form `parse_cores` reads."""
    parts, run = [], []
    for c in sorted(cores):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def available_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def bind_process(cores: Sequence[int]) -> None:
    """Run every thread of this process, and the threads it starts later, on `cores` only."""
    cores = set(cores)
    os.sched_setaffinity(0, cores)  # the calling thread: the threads it starts inherit it
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the threads already running keep their cores
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # the thread ended meanwhile
            pass


class CoreSlots:
    """Disjoint slices of `threads` cores for local workers: none at all when the first `num_workers`
    do not fit in `cores` (the scheduler places them); a worker added later gets the first free slice,
    or none when every slice is taken."""

    def __init__(self, threads: int, num_workers: int, cores: Sequence[int] | None = None) -> None:
        cores = list(available_cores() if cores is None else cores)
        self.threads = max(1, threads)
        fits = num_workers * self.threads <= len(cores)
        self._free = [cores[i:i + self.threads] for i in range(0, len(cores) - self.threads + 1, self.threads)] \
            if fits else []

    def take(self) -> list[int] | None:
        return self._free.pop(0) if self._free else None

    def release(self, cores: Sequence[int]) -> None:
        self._free.append(list(cores))
        self._free.sort()
