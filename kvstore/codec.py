"""How KV bytes travel and rest: raw tensor bytes behind a small fixed header. Never pickle.

An entry is one tensor (for a prefix block of the paged cache: [2, n_layers, n_kv_heads,
block_size, head_dim] in the model's dtype). Its `KVLayout` (dtype and shape) fixes its size, so
a store can hold entries in fixed-size slots. The header (`HEADER_BYTES`, little-endian) carries
the layout, the entry's 16-byte key hash, the payload size, an XXH3-64 checksum of the payload
(~20 GB/s here; zlib's CRC32 runs at ~4 GB/s), a 16-byte keyed MAC of the entry (set by a store
that authenticates its entries, kvstore/ssd.py; zeros otherwise) and a checksum of the header
itself (its zero padding is checked too), so that a torn or flipped header is detected as surely
as a damaged payload. The checksums catch damage; only the MAC, under a key the writer holds,
tells a forged entry from a real one.

Tensors become bytes and back without copies (`as_bytes`, `from_bytes`): a contiguous tensor is
viewed as uint8 and exposed through numpy's buffer; bf16 has no numpy dtype, which is why the
view goes through uint8.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvstore.keys import HASH_BYTES

MAGIC = b"KVW1"
VERSION = 2
"""2: the header carries a MAC (version 1 entries are refused, and an SSD tier erases them at start)."""
MAC_BYTES = 16
MAX_DIMS = 6
KIND_CODES = {"block": 1, "chunk": 2}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.uint8: 4, torch.int8: 5}
DTYPES_BY_CODE = {v: k for k, v in DTYPE_CODES.items()}

# magic, version, kind, dtype, ndim, shape[6], key, payload bytes, payload checksum, MAC; header checksum
_HEADER = struct.Struct(f"<4sHBBB{MAX_DIMS}I{HASH_BYTES}sQQ{MAC_BYTES}s")
_HEADER_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = 128
assert _HEADER.size + _HEADER_CHECKSUM.size <= HEADER_BYTES
_PADDING = bytes(HEADER_BYTES - _HEADER.size - _HEADER_CHECKSUM.size)  # zeros, checked on decode


class CorruptEntryError(ValueError):
    """Bytes that do not form a valid entry (bad magic, torn header, wrong size or checksum)."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """dtype and shape of one entry."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))  # a list or torch.Size compares equal
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported KV dtype {self.dtype}; valid: {', '.join(map(str, DTYPE_CODES))}")
        if not 0 < len(self.shape) <= MAX_DIMS or any(int(d) <= 0 for d in self.shape):
            raise ValueError(f"KV entry shape must have 1-{MAX_DIMS} positive dims, got {self.shape}")

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "KVLayout":
        return cls(tensor.dtype, tuple(tensor.shape))

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


@dataclass(frozen=True, slots=True)
class EntryHeader:
    key: bytes
    kind: str
    layout: KVLayout
    payload_bytes: int
    checksum: int
    mac: bytes = bytes(MAC_BYTES)


def checksum(data) -> int:
    """XXH3-64 of a bytes-like object."""
    return xxhash.xxh3_64_intdigest(data)


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (copies only when it is not contiguous or not on the CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def from_bytes(data, layout: KVLayout) -> torch.Tensor:
    """A tensor of `layout` over `data` (no copy; writable only if `data` is)."""
    if len(data) != layout.nbytes:
        raise CorruptEntryError(f"payload has {len(data)} bytes, layout {layout} needs {layout.nbytes}")
    arr = np.frombuffer(data, dtype=np.uint8)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).view(layout.dtype).view(layout.shape)


def encode_header(key: bytes, layout: KVLayout, payload_checksum: int, kind: str = "block",
                  mac: bytes = bytes(MAC_BYTES)) -> bytes:
    if len(key) != HASH_BYTES or len(mac) != MAC_BYTES:
        raise ValueError(f"key must be {HASH_BYTES} bytes, mac {MAC_BYTES}")
    shape = tuple(layout.shape) + (0,) * (MAX_DIMS - len(layout.shape))
    body = _HEADER.pack(MAGIC, VERSION, KIND_CODES[kind], DTYPE_CODES[layout.dtype], len(layout.shape), *shape,
                        key, layout.nbytes, payload_checksum, mac)
    return body + _HEADER_CHECKSUM.pack(checksum(body)) + _PADDING


def decode_header(data) -> EntryHeader:
    """Parse and verify a header; raises CorruptEntryError saying what is wrong."""
    if len(data) < HEADER_BYTES:
        raise CorruptEntryError(f"header truncated ({len(data)} of {HEADER_BYTES} bytes)")
    body = bytes(data[:_HEADER.size])
    (stored,) = _HEADER_CHECKSUM.unpack_from(data, _HEADER.size)
    magic, version, kind, dtype, ndim, *rest = _HEADER.unpack(body)
    if magic != MAGIC:
        raise CorruptEntryError("not a KV entry (bad magic)")
    if stored != checksum(body):
        raise CorruptEntryError("header checksum mismatch")
    if bytes(data[HEADER_BYTES - len(_PADDING):HEADER_BYTES]) != _PADDING:
        raise CorruptEntryError("header padding is not zero")
    if version != VERSION:
        raise CorruptEntryError(f"unsupported entry version {version}")
    shape, (key, payload_bytes, payload_checksum, mac) = rest[:MAX_DIMS], rest[MAX_DIMS:]
    if kind not in KIND_NAMES or dtype not in DTYPES_BY_CODE or not 0 < ndim <= MAX_DIMS:
        raise CorruptEntryError("header has an unknown kind, dtype or rank")
    layout = KVLayout(DTYPES_BY_CODE[dtype], tuple(shape[:ndim]))
    if layout.nbytes != payload_bytes:
        raise CorruptEntryError(f"header payload size {payload_bytes} does not match layout {layout}")
    return EntryHeader(key, KIND_NAMES[kind], layout, payload_bytes, payload_checksum, mac)


def verify(header: EntryHeader, payload) -> None:
    """Raise CorruptEntryError unless `payload` is the entry `header` describes."""
    if len(payload) != header.payload_bytes:
        raise CorruptEntryError(f"payload has {len(payload)} bytes, header says {header.payload_bytes}")
    if checksum(payload) != header.checksum:
        raise CorruptEntryError("payload checksum mismatch")
