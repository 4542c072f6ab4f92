"""Memory two processes of one node both map, for the IPC KV transport (kvstore/ipc_transfer.py):
`share` turns a tensor into an `IpcHandle` message, `open_shared` maps one back.

Host memory goes through a shared-memory file: the exporter creates one (mode 0600, in /dev/shm)
for each export, copies the entries into its mapping and unlinks it when the lease ends
(`ExportBuffer.close`); the importer maps it by name, read-only (a name is accepted only in that
folder and of that form, so a peer cannot make it map any other file). No helper process is
involved (torch's file_system sharing needs its shared-memory manager daemon, which can fail to
answer on a loaded machine). Device memory goes through CUDA IPC
(`UntypedStorage._share_cuda_`, and torch's `rebuild_cuda_tensor`): the handle of the caching allocator's block
that holds the tensor, a reference counter torch keeps in a shared file (the exporter's allocator
does not reuse the block until every importer dropped it), and an event recorded after the export
on the exporter's stream, which the importer's stream waits on before reading (no host sync).

The importer finds the exporter's GPU by UUID among the GPUs it sees (device indices differ
between processes whose CUDA_VISIBLE_DEVICES differ); a GPU it cannot see is an error, answered
before anything is mapped. These are the semi-private storage methods torch's own
multiprocessing reductions use (torch 2.11-2.13); nothing else in kvweave touches them.
"""
from __future__ import annotations

import functools
import os
import re
import secrets
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.codec import KVLayout
from kvweave.v1 import kvtransfer_pb2


class ShareError(RuntimeError):
    """The memory cannot be mapped here (another node, a GPU this process cannot see, a file gone)."""


@functools.cache
def node_id() -> str:
    """This machine's identity: its boot id (the same for every process and container of one boot
    of one host), with the host name where the kernel has none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def cuda_device_by_uuid(uuid: str) -> torch.device:
    """This process's index of the GPU with `uuid`; ShareError when it cannot see it."""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if _uuid(torch.device("cuda", i)) == uuid:
                return torch.device("cuda", i)
    raise ShareError(f"the peer's GPU {uuid} is not visible to this process (CUDA_VISIBLE_DEVICES="
                     f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): CUDA IPC needs both on one GPU "
                     f"or on GPUs this process sees; use the dist or tcp transport")


SHM_DIR = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
"""Where host exports live (a tmpfs where the system has one)."""
_SHM_NAME = re.compile(r"kvweave-ipc-[0-9a-f]{32}")


@dataclass
class ExportBuffer:
    """Exported entries and, for host memory, the shared-memory file that holds them."""

    tensor: torch.Tensor
    path: Path | None = None

    def close(self) -> None:
        """Unlink the file (mappings already made stay valid until their owners drop them)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def export_buffer(layer_major: torch.Tensor, device: torch.device | None) -> ExportBuffer:
    """[n_layers, n, ...] contiguous copy of layer-major entries [n, *shape] in memory `share` can
    hand out: a fresh shared-memory file for host memory (`device` None or cpu), else the device's
    memory (the entries' own storage when they are already contiguous layer-major there)."""
    lm = layer_major.movedim(2, 0)
    if device is None or device.type == "cpu":
        nbytes = max(lm.numel() * lm.element_size(), 1)
        path = SHM_DIR / f"kvweave-ipc-{secrets.token_hex(16)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        buffer = ExportBuffer(torch.empty(0, dtype=lm.dtype), path)
        try:
            storage = torch.UntypedStorage.from_file(str(path), True, nbytes)
            buffer.tensor.set_(storage, 0, lm.shape).copy_(lm)
        except BaseException:
            buffer.close()
            raise
        return buffer
    if lm.device == device and lm.is_contiguous():
        return ExportBuffer(lm)
    return ExportBuffer(lm.to(device, copy=True).contiguous())


def share(export: ExportBuffer) -> kvtransfer_pb2.IpcHandle:
    """The handle of an `export_buffer`; keep it open until the peer mapped it."""
    buffer = export.tensor
    if not buffer.is_contiguous():
        raise ValueError("only a contiguous tensor can be shared")
    storage = buffer.untyped_storage()
    offset = buffer.storage_offset()
    if buffer.device.type == "cpu":
        if export.path is None:
            raise ValueError("host memory is shared only as a file made by export_buffer")
        return kvtransfer_pb2.IpcHandle(host=kvtransfer_pb2.IpcHandle.Host(storage_handle=export.path.name.encode()),
                                        storage_bytes=storage.nbytes(), offset=offset)
    if buffer.device.type != "cuda":
        raise ValueError(f"cannot share {buffer.device} memory between processes")
    (_, mem, size, storage_offset, ref_handle, ref_offset, event, event_sync) = storage._share_cuda_()
    return kvtransfer_pb2.IpcHandle(
        cuda=kvtransfer_pb2.IpcHandle.Cuda(
            device_uuid=_uuid(buffer.device), mem_handle=mem, storage_offset_bytes=storage_offset,
            ref_counter_handle=ref_handle, ref_counter_offset=ref_offset, event_handle=event or b"",
            event_sync_required=event_sync),
        storage_bytes=size, offset=offset)


def handle_device(handle: kvtransfer_pb2.IpcHandle) -> str:
    """"cpu" or "cuda": what memory a handle names."""
    return "cuda" if handle.WhichOneof("memory") == "cuda" else "cpu"


def open_shared(handle: kvtransfer_pb2.IpcHandle, n: int, layout: KVLayout) -> torch.Tensor:
    """[n, *layout.shape] (layer-major, read-only by convention) over the memory `handle` names;
    ShareError when it cannot be mapped, ValueError when the handle cannot hold n entries."""
    kind = handle.WhichOneof("memory")
    if kind is None:
        raise ValueError("the handle names no memory")
    itemsize = torch.empty(0, dtype=layout.dtype).element_size()
    elements = n * layout.nbytes // itemsize
    if (handle.offset + elements) * itemsize > handle.storage_bytes:
        raise ValueError(f"the handle's {handle.storage_bytes} bytes cannot hold {n} entries of {layout} "
                         f"at element {handle.offset}")
    try:
        if kind == "host":
            name = handle.host.storage_handle.decode(errors="replace")
            if not _SHM_NAME.fullmatch(name):
                raise ShareError(f"the peer named {name[:60]!r}, not a kvweave shared-memory file")
            path = SHM_DIR / name
            if path.stat().st_size < handle.storage_bytes:
                raise ShareError(f"the peer's shared-memory file {name} is smaller than its handle says")
            storage = torch.UntypedStorage.from_file(str(path), False, handle.storage_bytes)
            device = torch.device("cpu")
        else:  # torch's own rebuild: it caches what this process mapped already (a CUDA IPC handle
            # maps once per process) and keeps the exporter's reference count right either way
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            c = handle.cuda
            device = cuda_device_by_uuid(c.device_uuid)
            shape = (layout.shape[1], n, layout.shape[0], *layout.shape[2:])
            with torch.cuda.device(device):
                flat = rebuild_cuda_tensor(
                    torch.Tensor, (elements,), (1,), handle.offset, torch.UntypedStorage, layout.dtype, device.index,
                    c.mem_handle, handle.storage_bytes, c.storage_offset_bytes, False, c.ref_counter_handle,
                    c.ref_counter_offset, c.event_handle, c.event_sync_required)
            return flat.view(shape).movedim(0, 2)
    except ShareError:
        raise
    except (RuntimeError, OSError) as e:
        where = "node" if kind == "host" else "GPU"
        raise ShareError(f"cannot map the peer's {kind} memory (is it on this {where}?): "
                         f"{str(e).strip().splitlines()[0]}") from None
    shape = (layout.shape[1], n, layout.shape[0], *layout.shape[2:])
    return torch.empty(0, dtype=layout.dtype, device=device).set_(storage, handle.offset, shape).movedim(0, 2)
