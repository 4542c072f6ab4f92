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


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_read_only_directory(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir(mode=0o500)
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
    assert fcntl.fcntl(tier._fd, fcntl.F_GETFL) & os.O_DIRECT
    tier.close()
    tier = open_tier(tmp_path / "buffered", use_direct_io=False)
    assert not tier.direct_io and not fcntl.fcntl(tier._fd, fcntl.F_GETFL) & os.O_DIRECT
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
