"""The SSD tier's file: restart, damage (flipped, torn, truncated), directories, layouts and I/O modes."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from pathlib import Path

import pytest
import torch

from kvstore.codec import HEADER_BYTES, KVLayout
from kvstore.ssd import SSDTier, slab_path, slot_size
from kvstore.tier import TierConfigError

LAYOUT = KVLayout(torch.bfloat16, (2, 3, 4, 16, 8))  # 3 KiB of payload: one 4 KiB slot
BIG = KVLayout(torch.float32, (2, 2, 1100))  # 17.6 KB of payload: a 20 KiB slot
SLOT = slot_size(LAYOUT)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def entry(i: int, layout: KVLayout = LAYOUT) -> torch.Tensor:
    raw = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
    return raw.view(layout.dtype).view(layout.shape)


def same_bytes(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def open_tier(directory: Path, entries: int = 8, layout: KVLayout = LAYOUT, **kwargs) -> SSDTier:
    return SSDTier(layout, entries * slot_size(layout), directory, **kwargs)


def filled(directory: Path, n: int, entries: int = 8, layout: KVLayout = LAYOUT) -> None:
    """Store entries 0..n-1 (in slots 0..n-1: free slots are taken lowest first) and close."""
    tier = open_tier(directory, entries, layout)
    for i in range(n):
        tier.put(key(i), entry(i, layout))
    tier.close()


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))


def o_direct_supported(directory: Path) -> bool:
    try:
        os.close(os.open(directory / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT))
    except OSError:
        return False
    finally:
        (directory / "probe").unlink(missing_ok=True)
    return True


def test_slots_are_aligned_and_the_file_preallocated(tmp_path):
    tier = open_tier(tmp_path, 5, BIG)
    assert tier.slot_bytes == 20480 and tier.capacity == 5
    assert tier.path == slab_path(tmp_path, BIG) == tmp_path / "kvweave-slab-float32-2x2x1100.bin"
    assert tier.path.stat().st_size == 5 * 20480
    assert tier.path.stat().st_blocks * 512 >= 5 * 20480  # allocated, not sparse
    tier.close()
    tier.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        tier.put(key(1), entry(1, BIG))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_restart_keeps_entries_and_eviction_goes_on(tmp_path, direct):
    tier = open_tier(tmp_path, 4, BIG, use_direct_io=direct)
    for i in range(3):
        tier.put(key(i), entry(i, BIG))
    tier.close()
    tier = open_tier(tmp_path, 4, BIG, use_direct_io=direct)
    assert sorted(tier.keys()) == [key(0), key(1), key(2)]
    assert all(same_bytes(tier.get(key(i)), entry(i, BIG)) for i in range(3))
    evicted: list[bytes] = []
    tier.on_evict = lambda k, v: evicted.append(k) if same_bytes(v, entry(int.from_bytes(k, "big"), BIG)) else None
    for i in range(3, 6):
        assert tier.put(key(i), entry(i, BIG))
    assert len(tier) == 4 and evicted == [key(0), key(1)]  # LRU: 0, 1, 2 were read back in that order
    tier.close()
    tier = open_tier(tmp_path, 4, BIG, use_direct_io=direct)
    assert sorted(tier.keys()) == [key(2), key(3), key(4), key(5)]
    assert all(same_bytes(tier.get(key(i)), entry(i, BIG)) for i in range(2, 6))
    tier.close()


def test_a_damaged_payload_is_a_miss_and_is_dropped(tmp_path):
    tier = open_tier(tmp_path, 4, BIG)
    for i in range(3):
        tier.put(key(i), entry(i, BIG))
    flip(tier.path, 1 * tier.slot_bytes + HEADER_BYTES + 5000)  # inside entry 1's payload
    assert tier.contains(key(1))  # checksums are verified on read, not on contains
    assert tier.get(key(1)) is None
    assert not tier.contains(key(1)) and tier.stats.corrupt == 1 and tier.stats.misses == 1
    assert same_bytes(tier.get(key(0)), entry(0, BIG)) and same_bytes(tier.get(key(2)), entry(2, BIG))
    tier.close()
    tier = open_tier(tmp_path, 4, BIG)  # the dropped slot was erased: it does not come back
    assert sorted(tier.keys()) == [key(0), key(2)]
    tier.close()


def test_a_damaged_payload_is_not_handed_to_the_eviction_hook(tmp_path):
    tier = open_tier(tmp_path, 2)
    evicted: list[bytes] = []
    tier.on_evict = lambda k, v: evicted.append(k)
    tier.put(key(0), entry(0))
    tier.put(key(1), entry(1))
    flip(tier.path, HEADER_BYTES + 10)
    tier.put(key(2), entry(2))  # evicts the damaged entry 0
    assert evicted == [] and sorted(tier.keys()) == [key(1), key(2)]
    assert tier.stats.evictions == 1 and tier.stats.corrupt == 1
    tier.close()


def test_a_slot_holding_another_entry_is_a_miss(tmp_path):
    tier = open_tier(tmp_path)
    tier.put(key(0), entry(0))
    tier.put(key(1), entry(1))
    with open(tier.path, "r+b") as f:  # a misdirected write: entry 0, valid in itself, lands in slot 1
        slot0 = f.read(SLOT)
        f.write(slot0)
    assert tier.get(key(1)) is None and tier.stats.corrupt == 1
    assert same_bytes(tier.get(key(0)), entry(0))
    tier.close()


def test_a_damaged_header_disappears_at_restart(tmp_path, caplog):
    filled(tmp_path, 4)
    flip(slab_path(tmp_path, LAYOUT), 2 * SLOT + 30)  # inside entry 2's key
    with caplog.at_level(logging.WARNING, logger="kvstore.ssd"):
        tier = open_tier(tmp_path)
    assert sorted(tier.keys()) == [key(0), key(1), key(3)]
    assert all(same_bytes(tier.get(key(i)), entry(i)) for i in (0, 1, 3))
    assert "1 damaged" in caplog.text
    tier.put(key(9), entry(9))  # the damaged slot is free again, and is taken first
    assert tier._slots[key(9)] == 2
    tier.close()


def test_a_header_damaged_while_open_is_a_miss(tmp_path):
    tier = open_tier(tmp_path)
    tier.put(key(0), entry(0))
    flip(tier.path, 4)
    assert tier.get(key(0)) is None and tier.stats.corrupt == 1 and len(tier) == 0
    tier.close()


@pytest.mark.parametrize("cut", [4 * SLOT, 4 * SLOT + HEADER_BYTES + 100, 4 * SLOT + 60],
                         ids=["at-a-slot-boundary", "inside-a-payload", "inside-a-header"])
def test_a_truncated_file_keeps_its_whole_slots(tmp_path, cut):
    filled(tmp_path, 8)
    path = slab_path(tmp_path, LAYOUT)
    os.truncate(path, cut)  # half the slots survive whole
    tier = open_tier(tmp_path)
    assert sorted(tier.keys()) == [key(i) for i in range(4)]
    assert all(same_bytes(tier.get(key(i)), entry(i)) for i in range(4))
    assert all(tier.get(key(i)) is None for i in range(4, 8))
    assert path.stat().st_size == 8 * SLOT
    for i in range(10, 14):  # the lost slots take new entries
        assert tier.put(key(i), entry(i))
    tier.close()
    tier = open_tier(tmp_path)
    assert sorted(tier.keys()) == [key(i) for i in range(4)] + [key(i) for i in range(10, 14)]
    assert all(same_bytes(tier.get(key(i)), entry(i)) for i in range(10, 14))
    tier.close()


def test_a_cut_short_slot_is_erased_not_adopted_later(tmp_path):
    filled(tmp_path, 8)
    path = slab_path(tmp_path, LAYOUT)
    os.truncate(path, 4 * SLOT + HEADER_BYTES + 100)  # slot 4 keeps its header, loses most of its payload
    open_tier(tmp_path).close()  # re-extends the file, with zeros where slot 4's payload was
    tier = open_tier(tmp_path)
    assert not tier.contains(key(4)) and len(tier) == 4
    tier.close()


def test_removed_and_evicted_entries_stay_gone_after_restart(tmp_path):
    tier = open_tier(tmp_path, 4)
    for i in range(4):
        tier.put(key(i), entry(i))
    tier.remove(key(1))
    tier.put(key(4), entry(4))  # takes the removed slot
    tier.put(key(5), entry(5))  # evicts entry 0
    tier.remove(key(3))
    tier.close()
    tier = open_tier(tmp_path, 4)
    assert sorted(tier.keys()) == [key(2), key(4), key(5)]
    tier.close()


def test_a_key_in_two_slots_is_kept_once(tmp_path):
    filled(tmp_path, 2)
    path = slab_path(tmp_path, LAYOUT)
    data = path.read_bytes()
    path.write_bytes(data[:SLOT] + data[:SLOT] + data[2 * SLOT:])  # entry 0 in slots 0 and 1
    tier = open_tier(tmp_path)
    assert tier.keys() == [key(0)] and same_bytes(tier.get(key(0)), entry(0))
    tier.close()
    data = path.read_bytes()
    assert data[SLOT:SLOT + HEADER_BYTES] == bytes(HEADER_BYTES)  # the copy was erased


def test_not_a_usable_directory(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    for directory in (a_file, a_file / "sub"):
        with pytest.raises(TierConfigError, match=re.escape(str(directory))):
            open_tier(directory)


def test_one_tier_per_file(tmp_path):
    tier = open_tier(tmp_path)
    with pytest.raises(TierConfigError, match="in use"):
        open_tier(tmp_path)
    tier.close()
    open_tier(tmp_path).close()


def test_layouts_do_not_share_a_file(tmp_path):
    small = open_tier(tmp_path, 4, LAYOUT)
    other = KVLayout(torch.float16, LAYOUT.shape)  # same size, other dtype
    big = open_tier(tmp_path, 4, other)
    small.put(key(1), entry(1))
    big.put(key(2), entry(2, other))
    assert small.path != big.path and not big.contains(key(1)) and not small.contains(key(2))
    small.close()
    big.close()
    big = open_tier(tmp_path, 4, other)
    assert big.keys() == [key(2)]
    big.close()


def test_o_direct_is_used_where_the_filesystem_allows(tmp_path):
    if not o_direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    tier = open_tier(tmp_path)
    assert tier.direct_io
    assert fcntl.fcntl(tier._file.fd, fcntl.F_GETFL) & os.O_DIRECT
    tier.close()
    tier = open_tier(tmp_path / "buffered", use_direct_io=False)
    assert not tier.direct_io and not fcntl.fcntl(tier._file.fd, fcntl.F_GETFL) & os.O_DIRECT
    tier.close()


def test_falls_back_to_buffered_io_when_direct_writes_are_refused(tmp_path, monkeypatch):
    if not o_direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    real_pwrite = os.pwrite

    def pwrite(fd: int, data, offset: int) -> int:  # a filesystem that opens with O_DIRECT, then refuses it
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    tier = open_tier(tmp_path)
    assert tier.direct_io
    tier.put(key(1), entry(1))
    assert not tier.direct_io and same_bytes(tier.get(key(1)), entry(1))
    tier.close()
    tier = open_tier(tmp_path)
    assert tier.keys() == [key(1)]
    tier.close()


# --- batched I/O ------------------------------------------------------------------------------


class IOCounter:
    """Counts the tier file's reads and writes (os.pwrite, os.pwritev, os.preadv; from any thread)."""

    def __init__(self, monkeypatch, tier: SSDTier, fail_write: int | None = None) -> None:
        self.writes: list[int] = []  # bytes of each write, in the order issued (0: failed)
        self.reads: list[int] = []
        self.written: set[int] = set()  # the slots written whole
        self.fail_write = fail_write  # the index of a write to fail with EIO
        for name, log in (("pwrite", self.writes), ("pwritev", self.writes), ("preadv", self.reads)):
            monkeypatch.setattr(os, name, self._counted(getattr(os, name), log, tier))

    def _counted(self, real, log: list[int], tier: SSDTier):
        def io(fd, data, offset, *rest):
            if fd != tier._file.fd:
                return real(fd, data, offset, *rest)
            size = sum(len(memoryview(b)) for b in data) if isinstance(data, list) else len(memoryview(data))
            if log is self.writes and len(log) == self.fail_write:
                log.append(0)
                raise OSError(errno.EIO, "Input/output error")
            log.append(size)
            n = real(fd, data, offset, *rest)
            if log is self.writes:
                self.written.update(range(offset // tier.slot_bytes, (offset + n) // tier.slot_bytes))
            return n
        return io


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_a_batched_write_reads_back_exactly_after_a_restart(tmp_path, direct):
    # A buffer of 8 slots in 4 parts: 13 entries take 7 writes, 6 of them by the I/O thread.
    tier = open_tier(tmp_path, 16, BIG, use_direct_io=direct, max_batch_bytes=8 * slot_size(BIG))
    assert tier.batch_slots == 8
    keys = [key(i) for i in range(13)]
    assert tier.put_many(keys, [entry(i, BIG) for i in range(13)]) == 13
    assert len(tier) == 13 and tier.stats.puts == 13 and tier.stats.bytes_written == 13 * BIG.nbytes
    assert tier._executor is not None  # the I/O thread took part
    tier.close()
    tier = open_tier(tmp_path, 16, BIG, use_direct_io=direct, max_batch_bytes=8 * slot_size(BIG))
    assert sorted(tier.keys()) == keys
    outs = [torch.empty(BIG.shape, dtype=BIG.dtype) for _ in range(13)]
    got = tier.get_many(keys[::-1], outs)
    assert all(g is o for g, o in zip(got, outs))
    assert all(same_bytes(o, entry(i, BIG)) for o, i in zip(outs, range(12, -1, -1)))
    assert tier.stats.hits == 13 and tier.stats.bytes_read == 13 * BIG.nbytes and tier.stats.corrupt == 0
    assert all(same_bytes(tier.get(key(i)), entry(i, BIG)) for i in range(13))
    tier.close()


def test_a_batch_larger_than_the_tier_keeps_its_last_entries(tmp_path):
    tier = open_tier(tmp_path, 4)
    tier.put_many([key(0), key(1)], [entry(0), entry(1)])
    evicted: list[bytes] = []
    dropped: list[bytes] = []
    tier.on_evict = lambda k, v: evicted.append(k) if same_bytes(v, entry(int.from_bytes(k, "big"))) else None
    tier.on_drop = dropped.append
    assert tier.put_many([key(i) for i in range(10, 18)], [entry(i) for i in range(10, 18)]) == 8
    gone = [key(i) for i in (0, 1, 10, 11, 12, 13)]
    assert evicted == gone and dropped == gone  # in order, each with its value
    assert sorted(tier.keys()) == [key(i) for i in range(14, 18)] and tier.stats.evictions == 6
    assert tier.stats.bytes_written == (2 + 4) * LAYOUT.nbytes  # the entries evicted by the batch were never written
    tier.close()
    tier = open_tier(tmp_path, 4)
    assert sorted(tier.keys()) == [key(i) for i in range(14, 18)]
    got = tier.get_many([key(i) for i in range(10, 18)])
    assert got[:4] == [None] * 4 and all(same_bytes(g, entry(i)) for g, i in zip(got[4:], range(14, 18)))
    tier.close()


def test_batched_io_is_one_call_per_run_of_slots(tmp_path, monkeypatch):
    tier = open_tier(tmp_path, 16)
    io = IOCounter(monkeypatch, tier)
    assert tier.put_many([key(i) for i in range(8)], [entry(i) for i in range(8)]) == 8
    assert io.writes == [8 * SLOT]  # slots 0-7: fresh, consecutive
    got = tier.get_many([key(i) for i in (5, 2, 7, 0, 1, 3, 4, 6)])  # any order: the slots are sorted
    assert io.reads == [8 * SLOT] and all(same_bytes(g, entry(i)) for g, i in zip(got, (5, 2, 7, 0, 1, 3, 4, 6)))
    io.reads.clear()
    got = tier.get_many([key(i) for i in (0, 1, 2, 4, 5, 99, 7)])  # slots 0-2, 4-5, 7
    assert io.reads == [3 * SLOT, 2 * SLOT, SLOT] and got[5] is None
    tier.close()


def test_a_batch_larger_than_the_buffer_is_split(tmp_path, monkeypatch):
    tier = open_tier(tmp_path, 32, max_batch_bytes=8 * SLOT + 100)  # 8 slots, in 4 parts of 2
    io = IOCounter(monkeypatch, tier)
    assert tier.put_many([key(i) for i in range(20)], [entry(i) for i in range(20)]) == 20
    assert io.writes == [2 * SLOT] * 10
    outs = [torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype) for _ in range(20)]
    assert tier.get_many([key(i) for i in range(20)], outs) == outs
    assert io.reads == [2 * SLOT] * 10 and all(same_bytes(o, entry(i)) for i, o in enumerate(outs))
    tier.close()


@pytest.mark.parametrize("where", [HEADER_BYTES + 1000, 4], ids=["payload", "header"])
def test_a_damaged_entry_in_a_batch_is_a_miss_between_good_ones(tmp_path, monkeypatch, where):
    tier = open_tier(tmp_path, 8)
    tier.put_many([key(i) for i in range(5)], [entry(i) for i in range(5)])
    dropped: list[bytes] = []
    tier.on_drop = dropped.append
    flip(tier.path, 2 * SLOT + where)  # entry 2, in the middle of one read of slots 0-4
    io = IOCounter(monkeypatch, tier)
    outs = [torch.zeros(LAYOUT.shape, dtype=LAYOUT.dtype) for _ in range(5)]
    got = tier.get_many([key(i) for i in range(5)], outs)
    assert io.reads == [5 * SLOT]
    assert got[2] is None and not outs[2].any()
    assert all(got[i] is outs[i] and same_bytes(outs[i], entry(i)) for i in (0, 1, 3, 4))
    assert dropped == [key(2)] and not tier.contains(key(2)) and len(tier) == 4
    assert tier.stats.corrupt == 1 and tier.stats.misses == 1 and tier.stats.hits == 4
    tier.close()
    tier = open_tier(tmp_path, 8)  # the damaged slot was erased
    assert sorted(tier.keys()) == [key(i) for i in (0, 1, 3, 4)]
    tier.close()


def test_a_wrong_layout_in_a_batch_stores_nothing(tmp_path):
    tier = open_tier(tmp_path, 8)
    tier.put(key(0), entry(0))
    before = tier.path.read_bytes()
    values = [entry(1), entry(2, BIG), entry(3)]
    with pytest.raises(ValueError, match="holds"):
        tier.put_many([key(1), key(2), key(3)], values)
    assert tier.keys() == [key(0)] and tier.stats.puts == 1 and tier.path.read_bytes() == before
    tier.close()


def test_a_failed_batched_write_leaves_no_slot_without_its_data(tmp_path, monkeypatch):
    tier = open_tier(tmp_path, 16, max_batch_bytes=8 * SLOT)  # 4 parts of 2 slots: one write per 2 entries
    io = IOCounter(monkeypatch, tier, fail_write=2)
    with pytest.raises(OSError):
        tier.put_many([key(i) for i in range(8)], [entry(i) for i in range(8)])
    # Slots 0-1, 2-3, 4-5 go to the I/O threads, 6-7 are written by the caller, in parallel: the third
    # write issued may be any of them, and any of those issued after it may have been written.
    assert io.writes.count(0) == 1 and set(io.writes) == {0, 2 * SLOT} and len(io.written) >= 4
    assert sorted(tier._slots.values()) == sorted(io.written) and tier.stats.puts == len(tier)
    assert len(tier) == len(io.written) < 8 and len(tier._free) == 16 - len(tier)  # the others are free again
    stored = sorted(int.from_bytes(k, "big") for k in tier.keys())
    assert all(same_bytes(g, entry(i)) for i, g in zip(stored, tier.get_many([key(i) for i in stored])))
    io.fail_write = None
    assert tier.put_many([key(i) for i in range(10)], [entry(i) for i in range(10)]) == 10
    tier.close()
    monkeypatch.undo()
    tier = open_tier(tmp_path, 16)
    assert sorted(tier.keys()) == [key(i) for i in range(10)]
    assert all(same_bytes(g, entry(i)) for i, g in enumerate(tier.get_many([key(i) for i in range(10)])))
    tier.close()
