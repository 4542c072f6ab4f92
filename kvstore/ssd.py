"""The SSD tier: entries in fixed slots of one preallocated slab file, written with O_DIRECT.

One file per layout (`kvweave-slab-<dtype>-<shape>.bin`), so models with different KV layouts can
share a directory without seeing each other's entries. Slot `i` sits at `i * slot_bytes`, where
`slot_bytes` is the 128-byte header plus the payload rounded up to 4 KiB; the file is preallocated
(`posix_fallocate`, or `ftruncate` where the filesystem cannot), so a put never grows it. An
exclusive `flock` keeps a second tier (in this process or another) off a file in use (the file's
opening, locking and O_DIRECT I/O: kvstore/slab.py).

I/O bypasses the page cache (O_DIRECT) where the filesystem allows: cached KV would otherwise
double-count against the DRAM tier and evict it. O_DIRECT needs aligned buffers, offsets and
lengths, so every read and write goes through one reused page-aligned buffer (an anonymous mmap)
of one slot: a put copies the value into it behind its header and issues one `pwrite` of the whole
slot; a get is one `preadv` into it, then a copy out (one memcpy each, see `kvstore.dram`). Where
O_DIRECT is refused (tmpfs, some network filesystems: EINVAL at open or at the first I/O) the tier
falls back to buffered I/O and says so in `direct_io`.

One I/O per slot (~360 KiB for a block of a 30-layer model) is dominated by its latency.
`put_many` and `get_many` batch: they lay the slots of a batch out as on disk in a second reused
aligned buffer (`max_batch_bytes`, 8 MiB by default) and issue one I/O per run of consecutive slot
numbers, which is what a batch of new entries gets (free slots are taken lowest first, and the
slots that LRU frees are those of the oldest entries, themselves written together). The buffer is
used in `io_parts` (4) parts: the caller's thread copies entries into (out of) one part and
checksums them (~8 GB/s here) while `io_threads` (2) I/O threads write (read) the parts already
filled (asked for), so that the copies overlap the I/O and a second I/O is in flight when one
completes. A run is split at the end of a part (5 slots, 1.8 MiB, for the block above); a batch
larger than the buffer goes round it again. A call returns once all its I/O is done; a call that
fits in one part does its I/O itself.

Measured here (a VM whose disk and memory speeds vary from minute to minute) for that block in
batches of 32, against the same bytes in 4 MiB O_DIRECT pieces: one I/O per slot reached 0.2-0.4 of
the raw write bandwidth (reads 0.3-0.6), batched 0.4-0.75 (reads 0.45-0.9). Batched I/O in line
with the copies reached 0.45-0.55; two I/O threads beat one in three A/B runs of four and tied in
the fourth; more parallel raw I/O did not make this disk faster.

Every entry is authenticated: its header carries a 16-byte keyed BLAKE2b MAC of (layout, key,
payload) under `mac_key` (the "ssd-mac" sub-key of the cluster secret; without a secret, a random
key in `kvweave-ssd.key`, mode 0600, made once per directory: kvstore/slab.py). A get recomputes it (~1 GB/s, beside
the disk read), so an entry written by anyone without the key, with valid checksums or not, is
dropped and counted in `stats.corrupt`, never served. Under a new cluster secret old entries are
unreachable anyway (the block hashes are keyed with it too). The slab file is created 0600 and
its directory 0700: the service user's only.

Nothing is fsynced: this is a cache. A write torn by a crash leaves a slot whose header checksum
(which covers the key and the payload checksum) or payload checksum fails, so it is never served.
A removed slot gets its header zeroed, so a restart does not bring it back (an evicted slot is
overwritten by the entry that evicted it).

At start the map is rebuilt from the headers alone (one 4 KiB read per slot): slots whose header
decodes, with this layout, are adopted; damaged ones are erased with a warning; a slot cut short by
a truncated file is erased and the file re-extended. Payload checksums are verified lazily, on
each get (and before an eviction hands the value on), which keeps a start over a large file fast;
a damaged payload is then dropped and counted in `stats.corrupt`. Recency is not persisted: after
a restart, eviction order starts from slot order.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import heapq
import logging
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from kvstore.codec import (HEADER_BYTES, MAC_BYTES, CorruptEntryError, KVLayout, checksum, decode_header, encode_header,
                           verify)
from kvstore.dram import copy_in, copy_out
from kvstore.eviction import EvictionPolicy
from kvstore.slab import SlabFile, directory_mac_key
from kvstore.tier import SlotTier, TierConfigError, capacity_entries

logger = logging.getLogger(__name__)

ALIGN = 4096
"""O_DIRECT alignment of buffers, offsets and lengths (covers 512-byte and 4 KiB sector devices)."""

MAX_BATCH_BYTES = 8 << 20
"""Default size of the buffer of batched I/O (it holds at least one slot)."""


def _runs(slots: Sequence[int]):
    """(first index, count) of each run of consecutive numbers in `slots` (ascending)."""
    first = 0
    for j in range(1, len(slots) + 1):
        if j == len(slots) or slots[j] != slots[j - 1] + 1:
            yield first, j - first
            first = j


def layout_tag(layout: KVLayout) -> str:
    """`bfloat16-2x30x3x16x64`: names the slab file of a layout."""
    return f"{str(layout.dtype).removeprefix('torch.')}-{'x'.join(map(str, layout.shape))}"


def slab_path(directory: str | Path, layout: KVLayout) -> Path:
    return Path(directory) / f"kvweave-slab-{layout_tag(layout)}.bin"


def slot_size(layout: KVLayout) -> int:
    """Bytes of one slot on disk: header and payload, rounded up to the O_DIRECT alignment."""
    return -(-(HEADER_BYTES + layout.nbytes) // ALIGN) * ALIGN


class SSDTier(SlotTier):
    _executor: ThreadPoolExecutor | None = None
    _executor_pid = -1
    io_parts = 4
    io_threads = 2
    """Threads that issue the batched I/O (two keep a second I/O in flight while one completes)."""
    """Parts of the batch buffer (see the module doc): up to this many I/Os of a batched call are
    in flight or queued at once."""

    def __init__(self, layout: KVLayout, capacity_bytes: float, directory: str | Path,
                 policy: EvictionPolicy | None = None, use_direct_io: bool | None = None,
                 max_batch_bytes: int = MAX_BATCH_BYTES, mac_key: bytes | None = None) -> None:
        """`mac_key`: the key of the entries' MAC (None: the directory's own, see `directory_mac_key`)."""
        self.slot_bytes = slot_size(layout)
        capacity = capacity_entries("SSD", capacity_bytes, layout, self.slot_bytes)
        super().__init__("ssd", layout, capacity, policy)
        self.directory = Path(directory)
        self.path = slab_path(directory, layout)
        self._file: SlabFile | None = None
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # not shared with a forked child
        self._buf = mmap.mmap(-1, self.slot_bytes, flags=private)  # page aligned, reused by every read and write
        self._view = memoryview(self._buf)
        self._payload = np.frombuffer(self._buf, dtype=np.uint8, count=layout.nbytes, offset=HEADER_BYTES)
        self._zeros = mmap.mmap(-1, ALIGN, flags=private)  # an aligned zero page, to erase a header
        # The batch buffer: `batch_slots` slots laid out as on disk, so that a run of consecutive slots
        # is one contiguous, aligned piece of it. Pages are only touched (allocated) by a batched call.
        # It is used in `io_parts` parts of `_seg_slots` slots (see the module doc).
        self.batch_slots = max(1, int(max_batch_bytes) // self.slot_bytes)
        self._parts = max(1, min(self.io_parts, self.batch_slots))
        self._seg_slots = self.batch_slots // self._parts
        self._batch = mmap.mmap(-1, self.batch_slots * self.slot_bytes, flags=private)
        self._batch_view = memoryview(self._batch)
        self._batch_slot_views = [self._batch_view[j * self.slot_bytes:(j + 1) * self.slot_bytes]
                                  for j in range(self.batch_slots)]
        self._batch_payloads = [np.frombuffer(self._batch, dtype=np.uint8, count=layout.nbytes,
                                              offset=j * self.slot_bytes + HEADER_BYTES)
                                for j in range(self.batch_slots)]
        self._batch_errors: list[CorruptEntryError | None] = [None] * self.batch_slots
        try:
            self._file = SlabFile(self.directory, self.path, use_direct_io is not False)
            self._mac_key = mac_key or directory_mac_key(self.directory)
            self._mac_prefix = layout_tag(layout).encode()
            self._load()
        except BaseException:
            self.close()
            raise

    # --- setup ------------------------------------------------------------------------------

    def _load(self) -> None:
        """Adopt the entries the file holds, erase damaged and cut-short slots, size the file."""
        size = self._file.size()
        whole = min(self.capacity, size // self.slot_bytes)
        head = self._view[:ALIGN]
        found: dict[bytes, int] = {}
        stale: list[int] = []
        damaged = duplicates = 0
        for slot in range(whole):
            self._file.pread(head, slot * self.slot_bytes)
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
            os.ftruncate(self._file.fd, want)
        elif size < want:
            try:
                os.posix_fallocate(self._file.fd, 0, want)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise TierConfigError(f"SSD cache directory {str(self.directory)!r} has no room for "
                                          f"{want / 2**30:.2f} GiB ({self.capacity} entries of {self.layout})") from e
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                os.ftruncate(self._file.fd, want)  # sparse: blocks are allocated on first write

    # --- slot I/O ---------------------------------------------------------------------------

    def _mac(self, key: bytes, payload: np.ndarray) -> bytes:
        h = hashlib.blake2b(self._mac_prefix, key=self._mac_key, digest_size=MAC_BYTES)
        h.update(key)
        h.update(payload)
        return h.digest()

    def _header(self, key: bytes, payload: np.ndarray) -> bytes:
        return encode_header(key, self.layout, checksum(payload), mac=self._mac(key, payload))

    def _write_slot(self, slot: int, key: bytes, value: torch.Tensor) -> None:
        copy_in(self._payload, value)
        self._view[:HEADER_BYTES] = self._header(key, self._payload)
        self._file.pwrite(self._view, slot * self.slot_bytes)

    def _read_slot(self, slot: int, key: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        try:
            n = self._file.pread(self._view, slot * self.slot_bytes)
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
        if not hmac.compare_digest(header.mac, self._mac(key, payload)):
            raise CorruptEntryError(f"slot {slot}: MAC mismatch (an entry written without this store's key)")

    # --- batched I/O ------------------------------------------------------------------------

    def put_many(self, keys: Sequence[bytes], values: Sequence[torch.Tensor],
                 costs: Sequence[float] | None = None) -> int:
        """`put` of each in turn, with one write per run of consecutive slots (see the module doc).

        Returns how many puts succeeded (a held key, only touched, counts; a key repeated in the batch
        is written once). Every value is checked before anything is stored. All slots are taken
        first, evicting as `put` would: an entry of this batch evicted by a later one is never
        written, and `on_evict` gets the caller's value. A failed write raises, and the entries not
        written by then are not stored (their slots are free again)."""
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

    def get_many(self, keys: Sequence[bytes],
                 outs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
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
            seg, parts = self._seg_slots, self._parts
            jobs = range(0, len(order), seg)
            inline = parts == 1 or len(jobs) == 1
            busy: list[Future | None] = [None] * parts
            damaged: list[tuple[bytes, CorruptEntryError]] = []  # dropped once no I/O is in flight

            def issue(n: int) -> None:  # read job `n` into its part of the buffer
                base, chunk = (n % parts) * seg, order[jobs[n]:jobs[n] + seg]
                self._batch_errors[base:base + len(chunk)] = [None] * len(chunk)
                if inline:
                    self._read_runs(base, chunk)
                else:
                    busy[n % parts] = self._worker().submit(self._read_runs, base, chunk)

            try:
                for n in range(min(parts, len(jobs))):
                    issue(n)
                for n, start in enumerate(jobs):
                    h = n % parts
                    if busy[h] is not None:
                        future, busy[h] = busy[h], None
                        future.result()
                    for j, slot in enumerate(order[start:start + seg], h * seg):
                        indices = wanted[slot]
                        key = keys[indices[0]]
                        try:
                            if self._batch_errors[j] is not None:
                                raise self._batch_errors[j]
                            self._verify_slot(slot, key, self._batch_slot_views[j], self._batch_payloads[j])
                        except CorruptEntryError as e:
                            damaged.append((key, e))
                            continue
                        for i in indices:
                            results[i] = copy_out(self._batch_payloads[j], self.layout,
                                                  None if outs is None else outs[i])
                    if n + parts < len(jobs):
                        issue(n + parts)
            finally:  # never leave a read running into the buffer
                wait([future for future in busy if future is not None])
            for key, e in damaged:
                logger.warning("%s tier: dropping damaged entry %s: %s", self.name, key.hex(), e)
                self.stats.corrupt += 1
                self._drop(key)
            for key, value in zip(keys, results):  # in the caller's order, as a loop of `get` would
                if value is None:
                    self.stats.misses += 1
                else:
                    self.policy.access(key)
                    self.stats.hits += 1
                    self.stats.bytes_read += self.layout.nbytes
        return results

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
        """Write the `pending` entries in slot order, in jobs of one part of the batch buffer each: this
        thread fills a part while the I/O threads write those filled before; it writes the last one
        itself. Each key written leaves `pending`."""
        order = sorted(pending, key=self._slots.__getitem__)
        slots = [self._slots[k] for k in order]
        seg, parts, nbytes = self._seg_slots, self._parts, self.layout.nbytes
        busy: list[tuple[Future, int, list[int]] | None] = [None] * parts  # per part: its job in flight

        def forget(start: int, done: list[int]) -> None:  # the keys a job wrote leave `pending`
            written = sum(done)
            for key in order[start:start + written]:
                del pending[key]
            self.stats.bytes_written += written * nbytes

        def settle(h: int) -> None:  # wait for the job of part `h`; raises its error
            future, start, done = busy[h]
            busy[h] = None
            try:
                future.result()
            finally:
                forget(start, done)

        try:
            for n, start in enumerate(range(0, len(order), seg)):
                h = n % parts
                if busy[h] is not None:
                    settle(h)
                base, chunk = h * seg, order[start:start + seg]
                for j, key in enumerate(chunk, base):
                    payload = self._batch_payloads[j]
                    copy_in(payload, values[pending[key]])
                    self._batch_slot_views[j][:HEADER_BYTES] = self._header(key, payload)
                done: list[int] = []
                if parts == 1 or start + seg >= len(order):  # the last job: here, beside the others
                    try:
                        self._write_runs(base, slots[start:start + seg], done)
                    finally:
                        forget(start, done)
                    for other in range(parts):
                        if busy[other] is not None:
                            settle(other)
                else:
                    future = self._worker().submit(self._write_runs, base, slots[start:start + seg], done)
                    busy[h] = (future, start, done)
        except BaseException:
            for h in range(parts):  # let a write in flight finish (kept if it succeeds), then raise
                if busy[h] is not None:
                    try:
                        settle(h)
                    except BaseException:
                        pass
            raise

    def _write_runs(self, base: int, slots: Sequence[int], done: list[int]) -> None:
        """Write the entries at buffer positions `base`... to `slots`, one write per run of consecutive
        slots; `done` gets the count of each run written."""
        sb = self.slot_bytes
        for first, count in _runs(slots):
            start = (base + first) * sb
            self._file.pwrite(self._batch_view[start:start + count * sb], slots[first] * sb)
            done.append(count)

    def _read_runs(self, base: int, slots: Sequence[int]) -> None:
        """Read `slots` into buffer positions `base`..., one read per run of consecutive slots."""
        for first, count in _runs(slots):
            self._read_run(base + first, slots[first], count)

    def _read_run(self, first: int, slot: int, count: int) -> None:
        """Read `count` slots from `slot` on into the batch buffer from position `first` on; a slot that
        cannot be read whole gets its CorruptEntryError in `_batch_errors`."""
        sb = self.slot_bytes
        try:
            n = self._file.pread(self._batch_view[first * sb:(first + count) * sb], slot * sb)
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

    def _worker(self) -> ThreadPoolExecutor:
        """The threads that run the batched I/O beside this one (started on first use, and again in a
        forked child, which does not inherit them)."""
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor = ThreadPoolExecutor(self.io_threads, thread_name_prefix="kvweave-ssd-io")
            self._executor_pid = os.getpid()
        return self._executor

    def _erase_slot(self, slot: int) -> None:
        self._file.pwrite(memoryview(self._zeros), slot * self.slot_bytes)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()  # also releases the flock
            if self._executor is not None:  # idle: batched I/O runs under the lock
                self._executor.shutdown(wait=False)
                self._executor = None

    @property
    def direct_io(self) -> bool:
        """Whether the slab file's I/O bypasses the page cache (O_DIRECT) now."""
        return self._file is not None and self._file.direct_io
