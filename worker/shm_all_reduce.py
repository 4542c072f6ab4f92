"""A sum all-reduce among one node's tensor-parallel ranks through shared memory (what vLLM's CPU
backend does instead of gloo): each rank copies its partial sum into its own slot of a shared
region and raises its flag; waiting means spinning until every rank's flag is up, then summing the
slots in rank order, so every rank gets the same bits. Over loopback gloo moves the same bytes
through the kernel's TCP stack in each direction; here an all-reduce is one copy and one pass of
adds per rank.

`allreduce([t])` starts one and returns a Work whose `wait()` completes it in place, like a
torch.distributed group's, so the model's hooks and the token-split loop use either. The region
has `SLOTS` slots per rank, used in turn by sequence number. A rank waits for all-reduce s before
it starts s + 2 (both callers do: the sequential hooks wait for each at once, the token-split loop
keeps two in flight), so when a rank reuses slot s % SLOTS for s + SLOTS every rank has finished
reading s: it saw their flags for s + 2, raised only after their wait for s.

Ordering. The flag is written after the slot's copy has returned, and x86's store order (TSO)
makes other cores see the data before the flag; `available` refuses other architectures (they fall
back to gloo; `EngineConfig.tp_allreduce` chooses). A wait that sees no progress for `timeout_s`, or whose `alive()` says a rank is gone,
raises RuntimeError (the executor turns it into TPGroupError).
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch

SLOTS = 4
_FLAG_STRIDE = 8
"""int64s between two ranks' flags (64 bytes: one cache line each)."""
_SPINS_BEFORE_YIELD = 200
_ALIVE_EVERY_S = 0.05


def available(device: torch.device) -> bool:
    """Whether ranks on `device` can all-reduce through shared memory here (CPU tensors on x86)."""
    return device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64")


def region_shape(size: int, max_numel: int) -> tuple[int, int, int]:
    return (SLOTS, size, max_numel)


class ShmAllReduce:
    """One rank's end. `data`: the shared `region_shape` region (the model's dtype); `flags`: a
    shared int64 tensor of `flags_numel` zeros; `fallback`: the group's gloo group, for a
    tensor larger than a slot or of another dtype; `alive()`: False when a rank is gone."""

    def __init__(self, rank: int, size: int, data: torch.Tensor, flags: torch.Tensor, fallback,
                 alive: Callable[[], bool] = lambda: True, timeout_s: float = 120.0) -> None:
        self.rank, self.size = rank, size
        self.data, self.max_numel = data, data.shape[2]
        self.flags = flags.numpy()
        self.fallback = fallback
        self.alive = alive
        self.timeout_s = timeout_s
        self.started = 0
        """All-reduces this rank has started (the next one's sequence number)."""
        self.done = 0

    def allreduce(self, tensors: list[torch.Tensor]):
        (t,) = tensors
        n = t.numel()
        if n > self.max_numel or t.dtype != self.data.dtype or not t.is_contiguous():
            return self.fallback.allreduce([t])
        seq = self.started
        if seq - self.done >= 2:
            raise RuntimeError("a third shared-memory all-reduce started before the first was waited for")
        self.started += 1
        self.data[seq % SLOTS, self.rank, :n].copy_(t.view(-1))
        self.flags[self.rank * _FLAG_STRIDE] = seq + 1
        return _Work(self, seq, t)

    def _complete(self, seq: int, t: torch.Tensor) -> None:
        flags, want = self.flags, seq + 1
        spins, deadline, checked = 0, None, time.monotonic()
        for k in range(self.size):
            while flags[k * _FLAG_STRIDE] < want:
                spins += 1
                if spins % _SPINS_BEFORE_YIELD == 0:
                    now = time.monotonic()
                    deadline = deadline or now + self.timeout_s
                    if now > deadline:
                        raise RuntimeError(f"tensor-parallel rank {k} did not reach all-reduce {seq} within "
                                           f"{self.timeout_s:g} s")
                    if now - checked > _ALIVE_EVERY_S:
                        checked = now
                        if not self.alive():
                            raise RuntimeError(f"a tensor-parallel rank is gone (waiting for rank {k} at "
                                               f"all-reduce {seq})")
                    time.sleep(0)
        n = t.numel()
        slots = self.data[seq % SLOTS, :, :n]
        out = t.view(-1)
        out.copy_(slots[0])
        for k in range(1, self.size):
            out.add_(slots[k])
        self.done = seq + 1


class _Work:
    __slots__ = ("owner", "seq", "tensor", "finished")

    def __init__(self, owner: ShmAllReduce, seq: int, tensor: torch.Tensor) -> None:
        self.owner, self.seq, self.tensor, self.finished = owner, seq, tensor, False

    def wait(self) -> bool:
        if not self.finished:
            if self.seq != self.owner.done:
                raise RuntimeError(f"all-reduce {self.seq} waited for out of order (next: {self.owner.done})")
            self.owner._complete(self.seq, self.tensor)
            self.finished = True
        return True


def flags_numel(size: int) -> int:
    """int64s of the flags tensor of `size` ranks."""
    return size * _FLAG_STRIDE
