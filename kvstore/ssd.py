"""The SSD tier: entries in fixed slots of one preallocated slab file, written with O_DIRECT.

One file per layout (`kvweave-slab-<dtype>-<shape>.bin`), so models with different KV layouts can
share a directory without seeing each other's entries. Slot `i` sits at `i * slot_bytes`, where
`slot_bytes` is the 128-byte header plus the payload rounded up to 4 KiB; the file is preallocated
(`posix_fallocate`, or `ftruncate` where the filesystem cannot), so a put never grows it. An
exclusive `flock` keeps a second tier (in this process or another) off a file in use.

I/O bypasses the page cache (O_DIRECT) where the filesystem allows: cached KV would otherwise
double-count against the DRAM tier and evict it. O_DIRECT needs aligned buffers, offsets and
lengths, so every read and write goes through one reused page-aligned buffer (an anonymous mmap)
of one slot: a put copies the value into it behind its header and issues one `pwrite` of the whole
slot; a get is one `preadv` into it, then a copy out (one memcpy each, see `kvstore.dram`). Where
O_DIRECT is refused (tmpfs, some network filesystems: EINVAL at open or at the first I/O) the tier
falls back to buffered I/O and says so in `direct_io`.

One I/O of one slot (~360 KiB for a block of a 30-layer model) is dominated by its latency: it ran
at a quarter of the disk's write bandwidth here. `put_many` and `get_many` coalesce: they lay the
slots of a batch out in a second reused aligned buffer (`max_batch_bytes`, 8 MiB by default; a
larger batch goes in several rounds) and issue one I/O per run of consecutive slot numbers, which
is what a batch of new entries gets (free slots are taken lowest first, and the slots LRU frees in
a steady stream are those of the oldest entries, written together as well).

Nothing is fsynced: this is a cache. A write torn by a crash leaves a slot whose header checksum
(which covers the key and the payload checksum) or payload checksum fails, so it is never served.
A removed or evicted slot gets its header zeroed, so a restart does not bring it back.

At start the map is rebuilt from the headers alone (one 4 KiB read per slot): slots whose header
decodes, with this layout, are adopted; damaged ones are erased with a warning; a slot cut short by
a truncated file is erased and the file re-extended. Payload checksums are verified lazily, on
each get (and before an eviction hands the value on), which keeps a start over a large file fast;
a damaged payload is then dropped and counted in `stats.corrupt`. Recency is not persisted: after
a restart, eviction order starts from slot order.
"""
from __future__ import annotations

import errno
import fcntl
import heapq
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from kvstore.codec import HEADER_BYTES, CorruptEntryError, KVLayout, checksum, decode_header, encode_header, verify
from kvstore.dram import copy_in, copy_out
from kvstore.eviction import EvictionPolicy
from kvstore.tier import SlotTier, TierConfigError, capacity_entries

logger = logging.getLogger(__name__)

ALIGN = 4096
"""O_DIRECT alignment of buffers, offsets and lengths (covers 512-byte and 4 KiB sector devices)."""

MAX_BATCH_BYTES = 8 << 20
"""Default size of the buffer of batched I/O: the largest single read or write (at least one slot)."""


def layout_tag(layout: KVLayout) -> str:
    """`bfloat16-2x30x3x16x64`: names the slab file of a layout."""
    return f"{str(layout.dtype).removeprefix('torch.')}-{'x'.join(map(str, layout.shape))}"


def slab_path(directory: str | Path, layout: KVLayout) -> Path:
    return Path(directory) / f"kvweave-slab-{layout_tag(layout)}.bin"


def slot_size(layout: KVLayout) -> int:
    """Bytes of one slot on disk: header and payload, rounded up to the O_DIRECT alignment."""
    return -(-(HEADER_BYTES + layout.nbytes) // ALIGN) * ALIGN


class SSDTier(SlotTier):
    _fd = -1

    def __init__(self, layout: KVLayout, capacity_bytes: float, directory: str | Path,
                 policy: EvictionPolicy | None = None, use_direct_io: bool | None = None,
                 max_batch_bytes: int = MAX_BATCH_BYTES) -> None:
        self.slot_bytes = slot_size(layout)
        capacity = capacity_entries("SSD", capacity_bytes, layout, self.slot_bytes)
        super().__init__("ssd", layout, capacity, policy)
        self.directory = Path(directory)
        self.path = slab_path(directory, layout)
        self.direct_io = False
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # not shared with a forked child
        self._buf = mmap.mmap(-1, self.slot_bytes, flags=private)  # page aligned, reused by every read and write
        self._view = memoryview(self._buf)
        self._payload = np.frombuffer(self._buf, dtype=np.uint8, count=layout.nbytes, offset=HEADER_BYTES)
        self._zeros = mmap.mmap(-1, ALIGN, flags=private)  # an aligned zero page, to erase a header
        # The batch buffer: `batch_slots` slots laid out as on disk, so that a run of consecutive slots
        # is one contiguous, aligned piece of it. Pages are only touched (allocated) by a batched call.
        self.batch_slots = max(1, int(max_batch_bytes) // self.slot_bytes)
        self._batch = mmap.mmap(-1, self.batch_slots * self.slot_bytes, flags=private)
        self._batch_view = memoryview(self._batch)
        self._batch_slot_views = [self._batch_view[j * self.slot_bytes:(j + 1) * self.slot_bytes]
                                  for j in range(self.batch_slots)]
        self._batch_payloads = [np.frombuffer(self._batch, dtype=np.uint8, count=layout.nbytes,
                                              offset=j * self.slot_bytes + HEADER_BYTES)
                                for j in range(self.batch_slots)]
        self._batch_errors: list[CorruptEntryError | None] = [None] * self.batch_slots
        try:
            self._open(use_direct_io is not False)
            self._load()
        except BaseException:
            self.close()
            raise

    # --- setup ------------------------------------------------------------------------------

    def _open(self, direct: bool) -> None:
        where = f"SSD cache directory {str(self.directory)!r}"
        if self.directory.exists() and not self.directory.is_dir():
            raise TierConfigError(f"{where} is not a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TierConfigError(f"{where} cannot be created: {e.strerror or e}") from e
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    self._fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
                    self.direct_io = True
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    logger.info("%s does not support O_DIRECT; using buffered I/O", self.directory)
            if self._fd < 0:
                self._fd = os.open(self.path, flags, 0o644)
        except OSError as e:  # opening for writing is the write probe (a read-only mount fails it, even for root)
            raise TierConfigError(f"{where} is not writable: cannot open {self.path.name}: {e.strerror or e}") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise TierConfigError(f"{self.path} is in use by another SSD tier (another process, "
                                  f"or a tier of this one not closed)") from e

    def _load(self) -> None:
        """Adopt the entries the file holds, erase damaged and cut-short slots, size the file."""
        size = os.fstat(self._fd).st_size
        whole = min(self.capacity, size // self.slot_bytes)
        head = self._view[:ALIGN]
        found: dict[bytes, int] = {}
        stale: list[int] = []
        damaged = duplicates = 0
        for slot in range(whole):
            self._pread(head, slot * self.slot_bytes)
            try:
                header = decode_header(head)
            except CorruptEntryError:
                if head[:HEADER_BYTES] != self._zeros[:HEADER_BYTES]:  # an all-zero header is an empty slot
                    damaged += 1
                    stale.append(slot)
                continue
            if header.layout != self.layout:
                damaged += 1
                stale.append(slot)
            elif header.key in found:
                duplicates += 1
                stale.append(slot)
            else:
                found[header.key] = slot
        if whole < self.capacity and size > whole * self.slot_bytes:
            stale.append(whole)  # cut short by a truncation: its header may survive, its payload does not
        self._size_file(size)
        for slot in stale:
            self._erase_slot(slot)
        if damaged or duplicates:
            logger.warning("SSD tier %s: erased %d damaged and %d duplicate slots at start",
                           self.path, damaged, duplicates)
        self._adopt(found.items())

    def _size_file(self, size: int) -> None:
        want = self.capacity * self.slot_bytes
        if size > want:
            logger.info("SSD tier %s: capacity shrank to %d entries; dropping the slots past it", self.path,
                        self.capacity)
            os.ftruncate(self._fd, want)
        elif size < want:
            try:
                os.posix_fallocate(self._fd, 0, want)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise TierConfigError(f"SSD cache directory {str(self.directory)!r} has no room for "
                                          f"{want / 2**30:.2f} GiB ({self.capacity} entries of {self.layout})") from e
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                os.ftruncate(self._fd, want)  # sparse: blocks are allocated on first write

    # --- slot I/O ---------------------------------------------------------------------------

    def _io(self, op: Callable[[int, memoryview, int], int], buf: memoryview, offset: int) -> int:
        if self._fd < 0:
            raise ValueError(f"SSD tier {self.path} is closed")
        try:
            return op(self._fd, buf, offset)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct_io:
                raise
        logger.warning("SSD tier %s: O_DIRECT I/O refused; falling back to buffered I/O", self.path)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct_io = False
        return op(self._fd, buf, offset)

    def _pread(self, buf: memoryview, offset: int) -> int:
        return self._io(lambda fd, b, off: os.preadv(fd, [b], off), buf, offset)

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        n = self._io(os.pwrite, buf, offset)
        if n != len(buf):
            raise OSError(errno.EIO, f"short write to {self.path} ({n} of {len(buf)} bytes)")

    def _write_slot(self, slot: int, key: bytes, value: torch.Tensor) -> None:
        copy_in(self._payload, value)
        self._view[:HEADER_BYTES] = encode_header(key, self.layout, checksum(self._payload))
        self._pwrite(self._view, slot * self.slot_bytes)

    def _read_slot(self, slot: int, key: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        try:
            n = self._pread(self._view, slot * self.slot_bytes)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            raise CorruptEntryError(f"unreadable slot {slot}: {e.strerror}") from e
        if n != self.slot_bytes:
            raise CorruptEntryError(f"slot {slot} cut short ({n} of {self.slot_bytes} bytes)")
        self._verify_slot(slot, key, self._view, self._payload)
        return copy_out(self._payload, self.layout, out)

    def _verify_slot(self, slot: int, key: bytes, view: memoryview, payload: np.ndarray) -> None:
        """Raise CorruptEntryError unless `view` (a slot read whole, `payload` its payload) holds `key`'s entry."""
        header = decode_header(view)
        if header.key != key or header.layout != self.layout:
            raise CorruptEntryError(f"slot {slot} holds another entry ({header.key.hex()}, {header.layout})")
        verify(header, payload)

    # --- batched I/O ------------------------------------------------------------------------

    def _runs(self, slots: Sequence[int]):
        """(first position, count) of each run of consecutive numbers in `slots` (sorted)."""
        first = 0
        for j in range(1, len(slots) + 1):
            if j == len(slots) or slots[j] != slots[j - 1] + 1:
                yield first, j - first
                first = j

    def put_many(self, keys: Sequence[bytes], values: Sequence[torch.Tensor],
                 costs: Sequence[float] | None = None) -> int:
        """`put` of each in turn, with one write per run of consecutive slots (see the module doc).

        Returns how many puts succeeded (a held key, only touched, counts; a key repeated in the batch
        is written once). All slots are taken first, evicting as `put` would: an entry of this batch
        evicted by a later one is never written, and `on_evict` gets the caller's value. A failed write
        raises, and the entries not written by then are not stored (their slots are free again)."""
        costs = self._check_batch(keys, values, costs)
        with self._lock:
            pending: dict[bytes, int] = {}  # key -> its index in `values`: has a slot, not written yet
            stored = 0
            try:
                for i, key in enumerate(keys):
                    if key in self._slots:
                        self.policy.access(key)
                        stored += 1
                        continue
                    if not self._free and not self._evict_for_batch(pending, values):
                        continue
                    self._slots[key] = heapq.heappop(self._free)
                    pending[key] = i
                    self.stats.puts += 1
                    self.policy.insert(key, costs[i])
                    stored += 1
                self._write_pending(pending, values)
            except BaseException:
                self.stats.puts -= len(pending)
                for key in pending:  # a slot, but no data: give the slot back
                    self.policy.remove(key)
                    heapq.heappush(self._free, self._slots.pop(key))
                raise
            return stored

    def _evict_for_batch(self, pending: dict[bytes, int], values: Sequence[torch.Tensor]) -> bool:
        """`_evict_one`, where the victim may be an entry of the batch being put (not written yet)."""
        victim = self.policy.victim()
        if victim is None:
            return False
        i = pending.pop(victim, None)
        if i is None:
            return self._evict_one()
        if self.on_evict is not None:
            try:
                self.on_evict(victim, values[i])
            except Exception:  # demotion is best effort; eviction must go on
                logger.exception("%s tier: eviction hook failed for %s", self.name, victim.hex())
        self._drop(victim, erase=False)
        self.stats.evictions += 1
        return True

    def _write_pending(self, pending: dict[bytes, int], values: Sequence[torch.Tensor]) -> None:
        """Write the `pending` entries, `batch_slots` at a time, one write per run; each key written
        leaves `pending`."""
        sb, slots = self.slot_bytes, self._slots
        order = sorted(pending, key=slots.__getitem__)
        for start in range(0, len(order), self.batch_slots):
            chunk = order[start:start + self.batch_slots]
            chunk_slots = [slots[k] for k in chunk]
            for j, key in enumerate(chunk):
                payload = self._batch_payloads[j]
                copy_in(payload, values[pending[key]])
                self._batch_slot_views[j][:HEADER_BYTES] = encode_header(key, self.layout, checksum(payload))
            for first, count in self._runs(chunk_slots):
                self._pwrite(self._batch_view[first * sb:(first + count) * sb], chunk_slots[first] * sb)
                for key in chunk[first:first + count]:
                    del pending[key]
                self.stats.bytes_written += count * self.layout.nbytes

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """`get` of each in turn (into `outs[i]` when given), with one read per run of consecutive slots.
        A damaged entry is dropped, counted in `stats.corrupt` and comes back None, as from `get`."""
        if outs is not None:
            if len(outs) != len(keys):
                raise ValueError(f"get_many got {len(keys)} keys and {len(outs)} outs")
            for out in outs:
                if out is not None:
                    self._check_value(out)
        results: list[torch.Tensor | None] = [None] * len(keys)
        with self._lock:
            wanted: dict[int, list[int]] = {}  # slot -> the indices of `keys` asking for it
            for i, key in enumerate(keys):
                slot = self._slots.get(key)
                if slot is not None:
                    wanted.setdefault(slot, []).append(i)
            order = sorted(wanted)
            errors = self._batch_errors
            for start in range(0, len(order), self.batch_slots):
                chunk = order[start:start + self.batch_slots]
                errors[:len(chunk)] = [None] * len(chunk)
                for first, count in self._runs(chunk):
                    self._read_run(first, chunk[first], count)
                for j, slot in enumerate(chunk):
                    indices = wanted[slot]
                    key = keys[indices[0]]
                    try:
                        if errors[j] is not None:
                            raise errors[j]
                        self._verify_slot(slot, key, self._batch_slot_views[j], self._batch_payloads[j])
                    except CorruptEntryError as e:
                        logger.warning("%s tier: dropping damaged entry %s: %s", self.name, key.hex(), e)
                        self.stats.corrupt += 1
                        self._drop(key)
                        continue
                    for i in indices:
                        results[i] = copy_out(self._batch_payloads[j], self.layout, None if outs is None else outs[i])
            for key, value in zip(keys, results):  # in the callers' order, as a loop of `get` would
                if value is None:
                    self.stats.misses += 1
                else:
                    self.policy.access(key)
                    self.stats.hits += 1
                    self.stats.bytes_read += self.layout.nbytes
        return results

    def _read_run(self, first: int, slot: int, count: int) -> None:
        """Read `count` slots from `slot` on into the batch buffer from position `first` on; a slot that
        cannot be read whole gets its CorruptEntryError in `_batch_errors`."""
        sb = self.slot_bytes
        try:
            n = self._pread(self._batch_view[first * sb:(first + count) * sb], slot * sb)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            if count == 1:
                self._batch_errors[first] = CorruptEntryError(f"unreadable slot {slot}: {e.strerror}")
            else:  # find the unreadable slots: the others are good
                for j in range(count):
                    self._read_run(first + j, slot + j, 1)
            return
        for j in range(n // sb, count):
            self._batch_errors[first + j] = CorruptEntryError(
                f"slot {slot + j} cut short ({max(0, n - j * sb)} of {sb} bytes)")

    def _erase_slot(self, slot: int) -> None:
        self._pwrite(memoryview(self._zeros), slot * self.slot_bytes)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)  # also releases the flock
                self._fd = -1

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
