"""What the KV transports (kvstore/transfer.py: gRPC; kvstore/tcp_transfer.py: raw TCP;
kvstore/dist_transfer.py: torch.distributed) share: the errors, the layout as it travels,
layer-major storage (each layer of the wire format one contiguous slice, so it is sent and
received in place), the source a server exports from and the checks on what it exports, the
checks a client makes before a fetch, the server's key limit, and the gathering of a layer from
entry-major tensors.
"""
from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from kvstore.codec import DTYPE_CODES, DTYPES_BY_CODE, MAX_DIMS, KVLayout, as_bytes
from kvstore.keys import HASH_BYTES
from kvweave.v1 import kvtransfer_pb2

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 300
DEFAULT_MAX_KEYS = 4096
"""Most keys one fetch may ask for, on both transports' servers."""


class TransferError(RuntimeError):
    """A fetch from a peer failed (connection, deadline, or an answer that failed a check)."""


class KVLayoutMismatchError(ValueError):
    """The entries asked for have another layout than the ones held."""


def layout_to_proto(layout: KVLayout) -> kvtransfer_pb2.KVLayoutProto:
    return kvtransfer_pb2.KVLayoutProto(dtype=DTYPE_CODES[layout.dtype], shape=[int(d) for d in layout.shape])


def layout_from_code(dtype_code: int, shape) -> KVLayout:
    """The layout of a dtype code and shape off the wire; ValueError if the dtype is unknown or the
    shape has no layer dim (both transports validate with this)."""
    if dtype_code not in DTYPES_BY_CODE:
        raise ValueError(f"unknown dtype code {dtype_code}; valid: {sorted(DTYPES_BY_CODE)}")
    shape = tuple(shape)
    if not 2 <= len(shape) <= MAX_DIMS:
        raise ValueError(f"entry shape must have 2-{MAX_DIMS} dims (dim 1 is the layer), got {list(shape)}")
    return KVLayout(DTYPES_BY_CODE[dtype_code], shape)


def layout_from_proto(msg: kvtransfer_pb2.KVLayoutProto) -> KVLayout:
    """The layout of `msg`; ValueError if the dtype is unknown or the shape has no layer dim."""
    return layout_from_code(msg.dtype, msg.shape)


def layer_geometry(layout: KVLayout) -> tuple[int, int, int]:
    """(n_layers, rows per entry and layer (shape[0]), bytes per row (shape[2:] x itemsize))."""
    row_bytes = layout.dtype.itemsize
    for d in layout.shape[2:]:
        row_bytes *= d
    return layout.shape[1], layout.shape[0], row_bytes


def layer_major(entries: torch.Tensor) -> torch.Tensor | None:
    """`entries` [n, s0, n_layers, ...] as the contiguous layer-major tensor [n_layers, n, s0, ...] it
    is a view of, or None when it is not one (then a layer must be gathered before it is sent)."""
    if entries.dim() < 3:
        return None
    lm = entries.movedim(2, 0)
    return lm if lm.is_contiguous() else None


def empty_layer_major(n: int, layout: KVLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """Uninitialised entries [n, *layout.shape] stored layer-major (see `layer_major`): each layer of
    the wire format is one contiguous slice, so it is received in place, without a staging copy.
    On the CPU unless `device` says otherwise."""
    shape = (layout.shape[1], n, layout.shape[0], *layout.shape[2:])
    if device is not None and torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=layout.dtype, device=device).movedim(0, 2)
    data = np.empty(n * layout.nbytes, dtype=np.uint8)
    return torch.from_numpy(data).view(layout.dtype).view(shape).movedim(0, 2)


def to_layer_major(entries: torch.Tensor) -> torch.Tensor:
    """`entries` [n, *shape] stored layer-major (see `layer_major`): themselves when they already
    are, else a layer-major copy on the same device (on the CPU copied a layer at a time with
    numpy, for the reason LayerGather gives)."""
    if layer_major(entries) is not None:
        return entries
    n, layout = entries.shape[0], KVLayout(entries.dtype, tuple(entries.shape[1:]))
    if entries.device.type != "cpu":
        out = torch.empty((layout.shape[1], n, layout.shape[0], *layout.shape[2:]), dtype=layout.dtype,
                          device=entries.device).movedim(0, 2)
        return out.copy_(entries)
    out = empty_layer_major(n, layout)
    src = entries.detach().unsqueeze(-1).view(torch.uint8).numpy()  # [n, s0, n_layers, ..., itemsize]
    dst = out.unsqueeze(-1).view(torch.uint8).numpy()
    for layer in range(layout.shape[1]):
        np.copyto(dst[:, :, layer], src[:, :, layer])
    return out


def empty_entries(n: int, layout: KVLayout) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor [n, *layout.shape]. Its memory comes from numpy, which
    advises the kernel to back large allocations with huge pages (MADV_HUGEPAGE): writing a fresh
    100 MB tensor costs ~4x less than torch.empty's 4 KiB page faults."""
    if n == 0:
        return torch.empty((0, *layout.shape), dtype=layout.dtype)
    data = np.empty(n * layout.nbytes, dtype=np.uint8)
    return torch.from_numpy(data).view(layout.dtype).view(n, *layout.shape)


def short_message(e: BaseException | str) -> str:
    """An error's text cut to a length fit for a status message or a log line."""
    text = str(e) or type(e).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


def check_fetch_args(keys: list[bytes], layout: KVLayout, timeout_s: float, out: torch.Tensor | None) -> None:
    """What both transports' clients check before a fetch: 16-byte keys, a positive deadline, and an
    `out` tensor (when given) that can hold the entries of `layout`. ValueError otherwise."""
    for i, key in enumerate(keys):
        if not isinstance(key, bytes) or len(key) != HASH_BYTES:
            raise ValueError(f"key {i} is not a {HASH_BYTES}-byte block hash")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if out is not None and (out.dtype != layout.dtype or tuple(out.shape[1:]) != layout.shape
                            or out.shape[0] < len(keys) or out.device.type != "cpu" or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous CPU tensor of >= {len(keys)} entries of layout {layout}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")


class KVSource(Protocol):
    """What a KVTransferService serves from (a worker's KV cache, a store tier, a dict in tests)."""

    async def export(self, keys: list[bytes], layout: KVLayout) -> torch.Tensor | None:
        """A tensor [n, *layout.shape] of the entries of the leading n keys held (None or n = 0 when
        the first is not). It must be a consistent snapshot: it is read while it is streamed.
        May raise KVLayoutMismatchError when the held entries have another layout.

        A source whose KV is on a GPU also takes `on_device=True` (the IPC transport asks for it
        when both ends are on GPUs): the entries are then returned in device memory."""
        ...


class TensorSource:
    """A KVSource over a dict key -> entry tensor (tests, benchmarks). All entries share one layout.
    The tensors are served as given, without copies: do not modify them in place while they are
    served. A run of entries that lie one after another in one storage (the rows of one tensor)
    is exported as a view of it; others are copied into one tensor."""

    def __init__(self, entries: dict[bytes, torch.Tensor] | None = None, layout: KVLayout | None = None) -> None:
        self.layout = layout
        self.entries: dict[bytes, torch.Tensor] = {}
        for key, entry in (entries or {}).items():
            self.put(key, entry)

    def put(self, key: bytes, entry: torch.Tensor) -> None:
        if len(key) != HASH_BYTES:
            raise ValueError(f"key must be {HASH_BYTES} bytes, got {len(key)}")
        entry = entry.detach().cpu().contiguous()
        layout = KVLayout.of(entry)
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(f"entry layout {layout} differs from the source's {self.layout}")
        self.entries[key] = entry

    async def export(self, keys: list[bytes], layout: KVLayout) -> torch.Tensor | None:
        if self.layout is not None and layout != self.layout:
            raise KVLayoutMismatchError(f"holds entries of layout {self.layout}, not {layout}")
        run = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None:
                break
            run.append(entry)
        if not run:
            return None
        first, nbytes = run[0], layout.nbytes
        storage, start = first.untyped_storage().data_ptr(), first.data_ptr()
        if all(e.untyped_storage().data_ptr() == storage and e.data_ptr() == start + i * nbytes
               for i, e in enumerate(run)):
            return first.as_strided((len(run), *layout.shape), (first.numel(), *first.stride()),
                                    first.storage_offset())
        out = empty_entries(len(run), layout)
        out_bytes = out.view(torch.uint8).numpy().reshape(len(run), -1)  # numpy: see LayerGather
        for i, entry in enumerate(run):
            out_bytes[i] = np.frombuffer(as_bytes(entry), dtype=np.uint8)
        return out


async def export_entries(source: KVSource, keys: list[bytes], layout: KVLayout, on_device: bool = False
                         ) -> tuple[torch.Tensor | None, tuple[str, str] | None]:
    """(entries or None when none are held, None) or (None, (gRPC status name, message)): what
    `source` exports for a valid request, checked the same way for every transport. `on_device`:
    ask the source for entries in its device memory (see KVSource)."""
    if not keys:
        return None, None
    try:
        entries = await (source.export(keys, layout, on_device=True) if on_device else source.export(keys, layout))
    except KVLayoutMismatchError as e:
        return None, ("FAILED_PRECONDITION", f"layout mismatch: {short_message(e)}")
    except Exception as e:
        logger.exception("KV export of %d keys failed", len(keys))
        return None, ("INTERNAL", f"internal error: {short_message(e)}")
    if entries is None or (entries.dim() >= 1 and entries.shape[0] == 0):  # holds none
        return None, None
    if entries.dtype != layout.dtype or tuple(entries.shape[1:]) != layout.shape:
        held = f"{str(entries.dtype).removeprefix('torch.')}{list(entries.shape[1:])}"
        return None, ("FAILED_PRECONDITION", f"layout mismatch: holds entries of layout {held}, not {layout}")
    if entries.shape[0] > len(keys):
        return None, ("INTERNAL", f"internal error: the source returned {entries.shape[0]} entries for "
                                  f"{len(keys)} keys")
    return entries, None


class LayerGather:
    """The contiguous bytes of entries[:, :, layer], gathered one layer at a time into one reused
    buffer (valid until the next `gather`: fresh buffers would be faulted in page by page, which
    costs more than the copy). CPU tensors are copied with numpy, whose copies stay fast when torch's
    OpenMP threads would compete for busy cores; other devices through torch, a layer at a time.

    `headroom`: bytes left free before the layer's data in the buffer (for a frame header); `gather`
    then returns them too. `buffer`: a uint8 array to reuse when it is large enough (`.buffer` is
    the one in use)."""

    def __init__(self, entries: torch.Tensor, headroom: int = 0, buffer: np.ndarray | None = None) -> None:
        self.entries = entries.detach()
        self.headroom = headroom
        self.array = None
        n_layers, rows, row_bytes = layer_geometry(KVLayout(self.entries.dtype, tuple(self.entries.shape[1:])))
        self.layer_bytes = self.entries.shape[0] * rows * row_bytes
        self.layers = layer_major(self.entries) if self.entries.device.type == "cpu" else None
        """Set when every layer is already contiguous: `layer` returns it without a copy."""
        if self.entries.device.type == "cpu":
            # [n, shape[0], n_layers, *shape[2:], itemsize] as uint8, over the same memory
            self.array = self.entries.unsqueeze(-1).view(torch.uint8).numpy()
        elif headroom == 0:
            self.buffer = None
            return
        size = headroom + self.layer_bytes
        self.buffer = buffer if buffer is not None and len(buffer) >= size else np.empty(size, dtype=np.uint8)

    def layer(self, i: int) -> memoryview | None:
        """Layer `i`'s bytes in place, when the entries are stored layer-major (else None)."""
        return None if self.layers is None else as_bytes(self.layers[i])

    def gather(self, layer: int) -> memoryview:
        if self.buffer is None:
            return as_bytes(self.entries[:, :, layer])
        out = self.buffer[:self.headroom + self.layer_bytes]
        data = out[self.headroom:]
        if self.array is None:
            np.copyto(data, np.frombuffer(as_bytes(self.entries[:, :, layer]), dtype=np.uint8))
        else:
            np.copyto(data.reshape(self.array[:, :, layer].shape), self.array[:, :, layer])
        return memoryview(out)
