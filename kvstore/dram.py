"""The DRAM tier: entries in one preallocated host pool.

The pool is a single uint8 tensor of `capacity` rows of one entry each, allocated once at start
(pinned when CUDA is present, so that copies to and from the device run as DMA and can overlap
with compute). It is made resident at start too: pinning does that, an unpinned pool is zeroed
(~4 GB/s here). Otherwise the first touch of each page costs its put (a fresh pool took puts at
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


class DRAMTier(SlotTier):
    def __init__(self, layout: KVLayout, capacity_bytes: float, policy: EvictionPolicy | None = None,
                 pin_memory: bool | None = None) -> None:
        capacity = capacity_entries("DRAM", capacity_bytes, layout)
        super().__init__("dram", layout, capacity, policy)
        self.pinned = pin_memory is not False and torch.cuda.is_available()
        try:
            self.pool = torch.empty((capacity, layout.nbytes), dtype=torch.uint8, pin_memory=self.pinned)
            if not self.pinned:  # pinning makes the pages resident; fault these in now, not on the puts
                self.pool.zero_()
        except RuntimeError as e:
            raise TierConfigError(f"cannot allocate the DRAM cache pool of {capacity} entries of {layout} "
                                  f"({capacity * layout.nbytes / 2**30:.2f} GiB): {e}") from e
        self._rows = self.pool.numpy()

    def _write_slot(self, slot: int, key: bytes, value: torch.Tensor) -> None:
        copy_in(self._rows[slot], value)

    def _read_slot(self, slot: int, key: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        return copy_out(self._rows[slot], self.layout, out)
