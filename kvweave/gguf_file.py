"""Read a GGUF file's metadata and tensor table quickly (torch-free: the router reads tokenizers).

gguf-py's `GGUFReader` builds a numpy view per metadata element: on SmolLM2-135M (49,152 token
strings and 48,900 merges) that is 4.3 s of every worker's and router's start. This reader walks
the header once with `struct` over the memory-mapped file (~0.1 s) and decodes every metadata value
to a plain Python value; tensors are numpy views of the mapping in the shapes `GGUFReader` gives
them (quantized types as bytes per row, for `gguf.quants.dequantize`), so nothing is read until a
tensor is used.

Format (GGUF v2 and v3, little-endian): magic, version, tensor count, metadata count; the metadata
as (key, type, value) with arrays as (element type, count, elements); the tensor table as (name,
dims fastest first, type, offset); the data from the next multiple of `general.alignment`.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")
"""A string's byte count."""
_PLAIN_TYPES = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    """GGUF's order: fastest-varying dimension first."""
    data: np.ndarray
    """A read-only view of the file: numpy order for plain types, [..., bytes per row] for quantized ones."""


class GGUFFile:
    """`fields` (metadata key -> decoded value: int, float, bool, str or list) and `tensors`."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf, self._pos = self._map, 0
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        self._pos = 4
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_fields = self._scalar("<Q"), self._scalar("<Q")
        try:
            self.fields: dict[str, Any] = {}
            for _ in range(n_fields):
                key = self._string()
                self.fields[key] = self._value(self._scalar("<I"))
            table = []
            for _ in range(n_tensors):
                name = self._string()
                dims = tuple(self._scalar("<Q") for _ in range(self._scalar("<I")))
                table.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        except struct.error:
            raise ValueError("the GGUF header is truncated") from None
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(start, *entry) for entry in table]

    def _tensor(self, start: int, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"tensor {name}: unknown GGML type {raw_type}") from None
        n = int(np.prod(dims)) if dims else 1
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = n * size // block
        if start + offset + nbytes > len(self._map):
            raise ValueError(f"tensor {name} runs past the end of the file")
        np_dims = tuple(reversed(dims))
        dtype = _PLAIN_TYPES.get(qtype)
        if dtype is None:
            data = np.frombuffer(self._map, np.uint8, nbytes, start + offset).reshape(
                quant_shape_to_byte_shape(np_dims, qtype))
        else:
            data = np.frombuffer(self._map, dtype, n, start + offset).reshape(np_dims)
        return GGUFTensor(name, qtype, dims, data)

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        return self._strings(1)[0]

    def _strings(self, count: int) -> list[str]:
        """`count` length-prefixed UTF-8 strings (a vocabulary or merges: one tight loop)."""
        buf, pos, end, out = self._map, self._pos, len(self._map), []
        length = _LENGTH.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise ValueError("the GGUF header is truncated")
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > end:
                raise ValueError("the GGUF header is truncated")
            out.append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            elem, count = self._scalar("<I"), self._scalar("<Q")
            if elem in _NUMPY:  # numbers: one read for the whole array
                dtype = np.dtype(_NUMPY[elem]).newbyteorder("<")
                if self._pos + count * dtype.itemsize > len(self._map):
                    raise ValueError("the GGUF header is truncated")
                values = np.frombuffer(self._map, dtype, count, self._pos)
                self._pos += count * dtype.itemsize
                return values.tolist()
            if elem == _STRING:
                return self._strings(count)
            return [self._value(elem) for _ in range(count)]
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise ValueError(f"unknown GGUF metadata type {kind}")
        return self._scalar(fmt)
