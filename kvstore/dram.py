"""The DRAM tier: entries in one preallocated host pool.

The pool is a single uint8 tensor of `capacity` rows of one entry each, allocated once at start
(pinned when CUDA is present, so that copies to and from the device run as DMA and can overlap
with compute: see `DRAMTier`). It is made resident at start too: it is zeroed (~4 GB/s here). Otherwise the first touch of each page costs its put (a fresh pool took puts at
1.5 GB/s, a resident one at 9-11), and a pool larger than the host would fail at some later put
instead of at start.

A put is one copy of the value into its row and a get one copy out of it: no bytes objects, no
allocation per put, no serialization; a value on the device or non-contiguous is copied straight
in. Host memory does not rot, so entries carry no checksum and a read never fails.

Host-to-host copies go through flat uint8 numpy views (`copy_in`, `copy_out`, shared with the SSD
tier): one memcpy, not torch's `copy_`, which splits a copy of a few hundred KB across the OpenMP
pool for no gain at memory bandwidth and leaves its workers spinning against the caller (on this
2-core host that made SSD slot I/O 5-10x slower and DRAM copies erratic); the numpy views also
cost ~2 us per copy where torch's typed views cost ~8.
"""
from __future__ import annotations

import numpy as np
import torch

from kvstore.codec import KVLayout
from kvstore.eviction import EvictionPolicy
from kvstore.tier import SlotTier, TierConfigError, capacity_entries


def host_bytes(tensor: torch.Tensor) -> np.ndarray | None:
    """The bytes of a contiguous host tensor as a flat uint8 numpy view; None for any other tensor."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    return tensor.detach().view(torch.uint8).numpy().reshape(-1)


def copy_in(dst: np.ndarray, value: torch.Tensor) -> None:
    """Copy `value` into `dst`, flat uint8 host memory of its size (one memcpy when `value` allows)."""
    src = host_bytes(value)
    if src is None:
        torch.from_numpy(dst).view(value.dtype).view(value.shape).copy_(value)
    else:
        np.copyto(dst, src)


def copy_out(src: np.ndarray, layout: KVLayout, out: torch.Tensor | None = None) -> torch.Tensor:
    """The entry in `src` (flat uint8 host memory) as a new tensor of `layout`, or copied into `out`."""
    if out is None:
        return torch.from_numpy(src.copy()).view(layout.dtype).view(layout.shape)
    dst = host_bytes(out)
    if dst is None:
        out.copy_(torch.from_numpy(src).view(layout.dtype).view(layout.shape))
    else:
        np.copyto(dst, src)
    return out


SLAB_BYTES = 1 << 30
"""The pinned pool is registered with CUDA in slabs of at most this size."""


def slabs(nbytes: int, slab: int = SLAB_BYTES) -> list[tuple[int, int]]:
    """(offset, size) of the slabs covering `nbytes`."""
    return [(o, min(slab, nbytes - o)) for o in range(0, nbytes, slab)]


class DRAMTier(SlotTier):
    """With CUDA, the pool is pinned: allocated as ordinary memory and registered with
    cudaHostRegister slab by slab (torch's pinned allocator rounds a request up to a power of two:
    40 GiB asked for would pin 64), and the copies of a batch to or from device memory are queued on
    a copy stream of their own and waited for once, at the end of the batch, by the thread that
    asked (the KV connector's, not the engine's): the engine's steps go on meanwhile."""

    def __init__(self, layout: KVLayout, capacity_bytes: float, policy: EvictionPolicy | None = None,
                 pin_memory: bool | None = None) -> None:
        capacity = capacity_entries("DRAM", capacity_bytes, layout)
        super().__init__("dram", layout, capacity, policy)
        self.pinned = pin_memory is not False and torch.cuda.is_available()
        self._registered: list[int] = []
        try:
            self.pool = torch.empty((capacity, layout.nbytes), dtype=torch.uint8)
            self.pool.zero_()  # resident now (registering pins it too), not faulted in by the puts
            if self.pinned:
                self._register()
        except RuntimeError as e:
            self.close()
            raise TierConfigError(f"cannot allocate the DRAM cache pool of {capacity} entries of {layout} "
                                  f"({capacity * layout.nbytes / 2**30:.2f} GiB): {e}") from e
        self._rows = self.pool.numpy()
        self._stream = torch.cuda.Stream() if self.pinned else None
        self._pending = None
        """The copy stream's event after the last copy of the batch in flight (not yet waited for)."""
        self._writing = False
        """Whether that batch writes rows (device -> pool): a row read meanwhile waits for it."""

    def _register(self) -> None:
        cudart, base = torch.cuda.cudart(), self.pool.data_ptr()
        for offset, size in slabs(self.pool.numel()):
            err = cudart.cudaHostRegister(base + offset, size, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {size} bytes failed (error {int(err)})")
            self._registered.append(base + offset)

    def close(self) -> None:
        self._wait()
        if self._registered:
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered = []
        super().close()

    def _wait(self) -> None:
        if getattr(self, "_pending", None) is not None:
            self._pending.synchronize()
            self._pending, self._writing = None, False

    def _row(self, slot: int) -> torch.Tensor:
        return self.pool[slot].view(self.layout.dtype).view(self.layout.shape)

    def put_many(self, keys, values, costs=None) -> int:
        if not (self.pinned and values and values[0].is_cuda):
            return super().put_many(keys, values, costs)
        # the copies read device memory the engine's stream wrote: start after it
        self._stream.wait_stream(torch.cuda.current_stream(values[0].device))
        try:
            return super().put_many(keys, values, costs)
        finally:
            self._wait()

    def get_many(self, keys, outs=None):
        if not (self.pinned and outs and any(o is not None and o.is_cuda for o in outs)):
            return super().get_many(keys, outs)
        try:
            return super().get_many(keys, outs)
        finally:
            self._wait()

    def _write_slot(self, slot: int, key: bytes, value: torch.Tensor) -> None:
        if self.pinned and value.is_cuda:
            with torch.cuda.stream(self._stream):
                self._row(slot).copy_(value, non_blocking=True)
                self._pending, self._writing = self._stream.record_event(), True
            return
        copy_in(self._rows[slot], value)

    def _read_slot(self, slot: int, key: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._writing:  # a row a copy in flight may still be writing (an eviction within a batch)
            self._wait()
        if self.pinned and out is not None and out.is_cuda:
            with torch.cuda.stream(self._stream):
                out.copy_(self._row(slot), non_blocking=True)
                self._pending = self._stream.record_event()
            return out
        return copy_out(self._rows[slot], self.layout, out)
