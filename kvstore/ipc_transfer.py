"""KV transfer between processes of one node through memory both map (kvstore/ipc_share.py): the
server end (`IpcServer`, which a KVTransferService serves `IpcFetch` and `IpcRelease` with) and
the client end (`IpcClient`, used by `TransferClient(transport="ipc")`).

A fetch. The client sends `IpcFetch` with the keys, the layout, its node id and where it wants the
entries ("cuda" from a GPU worker). The server checks the node (FAILED_PRECONDITION for a caller
on another node), validates and exports the leading run of held keys as the other transports do
(same statuses), places them layer-major in shareable memory (device memory when both sides are on
GPUs and the source exports on its device: a prefill worker's handoff blocks then never leave the
GPU; else a shared-memory file) and answers n, the layout, the memory's handle and a lease id. The
client maps the memory, copies the entries into its output (on its own device: a decode worker
receives straight onto its GPU) and releases the lease. Nothing is checksummed: the bytes never
leave the node's memory.

Leases. The server keeps each export until `IpcRelease` or until the lease runs out (the client's
`lease_ms`, at most `max_lease_s`; a client that died frees its export then), and holds at most
`max_leased_bytes` at once (RESOURCE_EXHAUSTED past it: the client retries over another transport
or later). A GPU export also stays allocated, by torch's CUDA IPC reference counting, until the
client has dropped its mapping.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from kvstore.codec import KVLayout
from kvstore.ipc_share import ExportBuffer, ShareError, export_buffer, node_id, open_shared, share
from kvstore.transfer_source import (KVSource, TransferError, empty_layer_major, export_entries, layout_from_proto,
                                     layout_to_proto, short_message, to_layer_major)
from kvweave.v1 import kvtransfer_pb2

logger = logging.getLogger(__name__)

_SERVICE = kvtransfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name
IPC_FETCH_METHOD = f"/{_SERVICE}/IpcFetch"
IPC_RELEASE_METHOD = f"/{_SERVICE}/IpcRelease"
DEFAULT_LEASE_S = 30.0
MAX_LEASE_S = 120.0
DEFAULT_MAX_LEASED_BYTES = 8 << 30
RELEASE_TIMEOUT_S = 5.0


@dataclass
class _Lease:
    buffer: ExportBuffer
    nbytes: int
    timer: asyncio.TimerHandle
    started: float
    """perf_counter() when the fetch came (on_served's seconds)."""


class IpcServer:
    """The server end of the IPC transport for one KVTransferService (give it as `ipc_server`).

    `device`: where the source's KV lives; a caller asking for "cuda" gets device memory when it is
    a GPU (the source's `export` is then called with `on_device=True`). `on_served(nbytes, seconds)`:
    after each fetch released by its client."""

    def __init__(self, source: KVSource, device: torch.device | str = "cpu", max_lease_s: float = MAX_LEASE_S,
                 max_leased_bytes: int = DEFAULT_MAX_LEASED_BYTES,
                 on_served: Callable[[int, float], None] | None = None) -> None:
        if not max_lease_s > 0 or max_leased_bytes <= 0:
            raise ValueError("max_lease_s and max_leased_bytes must be positive")
        self.source = source
        self.device = torch.device(device)
        self.max_lease_s = max_lease_s
        self.max_leased_bytes = max_leased_bytes
        self.on_served = on_served
        self._leases: dict[str, _Lease] = {}
        self._leased_bytes = 0

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    @property
    def leased_bytes(self) -> int:
        return self._leased_bytes

    async def fetch(self, request: kvtransfer_pb2.IpcFetchRequest, keys: list[bytes], layout: KVLayout,
                    context: grpc.aio.ServicerContext) -> kvtransfer_pb2.IpcFetchResponse:
        """IpcFetch of valid keys and layout."""
        t0 = time.perf_counter()
        if request.node_id != node_id():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the caller is on another node: IPC moves KV only between processes of one node")
        if request.device not in ("", "cpu", "cuda"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"device must be 'cpu' or 'cuda', got {request.device!r}")
        on_device = request.device == "cuda" and self.device.type == "cuda"
        lease_s = min(request.lease_ms / 1000 or DEFAULT_LEASE_S, self.max_lease_s)
        entries, error = await export_entries(self.source, keys, layout, on_device=on_device)
        if error is not None:
            await context.abort(grpc.StatusCode[error[0]], error[1])
        if entries is None:
            return kvtransfer_pb2.IpcFetchResponse(num_entries=0, layout=layout_to_proto(layout))
        nbytes = entries.numel() * entries.element_size()
        if self._leased_bytes + nbytes > self.max_leased_bytes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._leased_bytes} bytes are leased to peers already (at most "
                                f"{self.max_leased_bytes}); fetch again later or over another transport")
        try:
            buffer, handle = await asyncio.to_thread(self._share, entries, on_device)
        except (RuntimeError, ValueError) as e:
            logger.exception("sharing %d KV entries failed", entries.shape[0])
            await context.abort(grpc.StatusCode.INTERNAL, f"cannot share the entries: {short_message(e)}")
        lease_id = secrets.token_hex(16)
        timer = asyncio.get_running_loop().call_later(lease_s, self._expire, lease_id)
        self._leases[lease_id] = _Lease(buffer, nbytes, timer, t0)
        self._leased_bytes += nbytes
        return kvtransfer_pb2.IpcFetchResponse(num_entries=entries.shape[0], layout=layout_to_proto(layout),
                                               handle=handle, lease_id=lease_id)

    def _share(self, entries: torch.Tensor, on_device: bool):
        buffer = export_buffer(to_layer_major(entries.detach()), self.device if on_device else None)
        try:
            if buffer.tensor.device.type == "cuda":  # the export's copies, before the event _share_cuda_ records
                torch.cuda.current_stream(buffer.tensor.device).synchronize()
            return buffer, share(buffer)
        except BaseException:
            buffer.close()
            raise

    def release(self, lease_id: str) -> bool:
        """Free a lease's export; whether it was held."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        lease.timer.cancel()
        lease.buffer.close()
        self._leased_bytes -= lease.nbytes
        if self.on_served is not None:
            self.on_served(lease.nbytes, time.perf_counter() - lease.started)
        return True

    def _expire(self, lease_id: str) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            lease.buffer.close()
            self._leased_bytes -= lease.nbytes
            logger.info("IPC lease %s of %d bytes expired before its client released it", lease_id, lease.nbytes)

    def close(self) -> None:
        for lease in self._leases.values():
            lease.timer.cancel()
            lease.buffer.close()
        self._leases.clear()
        self._leased_bytes = 0


def _rpc_problem(e: grpc.aio.AioRpcError, timeout_s: float) -> str:
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no complete answer within the {timeout_s:.3g} s deadline"
    return f"{e.code().name}: {short_message(e.details() or 'no details')}"


class IpcClient:
    """Fetches KV from peers of this node over the IPC transport, into memory on `device` (a CPU
    worker: "cpu"; a GPU worker: its KV device, so that device memory is copied GPU to GPU)."""

    def __init__(self, device: torch.device | str = "cpu", lease_s: float = DEFAULT_LEASE_S) -> None:
        self.device = torch.device(device)
        self.lease_s = lease_s
        self._releasing: set[asyncio.Task] = set()

    async def fetch_kv(self, channel: grpc.aio.Channel, peer: str, keys: list[bytes], layout: KVLayout,
                       timeout_s: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, *layout.shape] from the peer serving KVTransfer on `channel` (its address `peer`), as
        `TransferClient.fetch_kv` (arguments already checked, `keys` not empty); `out` may be on any device."""
        fetch = channel.unary_unary(IPC_FETCH_METHOD, request_serializer=kvtransfer_pb2.IpcFetchRequest.SerializeToString,
                                    response_deserializer=kvtransfer_pb2.IpcFetchResponse.FromString)
        request = kvtransfer_pb2.IpcFetchRequest(
            fetch=kvtransfer_pb2.FetchRequest(keys=keys, layout=layout_to_proto(layout)), node_id=node_id(),
            device=self.device.type if out is None else out.device.type, lease_ms=int(self.lease_s * 1000))
        deadline = time.monotonic() + timeout_s
        try:
            reply = await fetch(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise TransferError(f"KV fetch from {peer}: the peer does not serve the ipc transport") from None
            raise TransferError(f"KV fetch from {peer}: {_rpc_problem(e, timeout_s)}") from None
        try:
            n = self._check(peer, reply, len(keys), layout)
            if n == 0:
                return torch.empty((0, *layout.shape), dtype=layout.dtype, device=self.device) if out is None else out[:0]
            remaining = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(asyncio.to_thread(self._copy, reply.handle, n, layout, out), remaining)
            except asyncio.TimeoutError:
                raise TransferError(f"KV fetch from {peer}: no complete copy within the {timeout_s:g} s deadline") from None
            except (ShareError, ValueError) as e:
                raise TransferError(f"KV fetch from {peer}: {e}") from None
        finally:
            if reply.lease_id:
                self._release(channel, peer, reply.lease_id)

    def _check(self, peer: str, reply: kvtransfer_pb2.IpcFetchResponse, requested: int, layout: KVLayout) -> int:
        n = reply.num_entries
        if n > requested:
            raise TransferError(f"KV fetch from {peer}: announced {n} entries for {requested} keys")
        try:
            answered = layout_from_proto(reply.layout)
        except ValueError as e:
            raise TransferError(f"KV fetch from {peer}: answered a bad layout: {e}") from None
        if answered != layout:
            raise TransferError(f"KV fetch from {peer}: answered layout {answered}, asked for {layout}")
        if n and not reply.HasField("handle"):
            raise TransferError(f"KV fetch from {peer}: announced {n} entries without a memory handle")
        return n

    def _copy(self, handle: kvtransfer_pb2.IpcHandle, n: int, layout: KVLayout, out: torch.Tensor | None) -> torch.Tensor:
        """The mapped entries copied into `out[:n]` or a fresh layer-major tensor on this client's
        device (a pool thread); the mapping is dropped before returning."""
        mapped = open_shared(handle, n, layout)
        if out is None:
            out = empty_layer_major(n, layout, self.device)
        result = out[:n]
        result.copy_(mapped)
        for device in {result.device, mapped.device}:
            if device.type == "cuda":  # the copy is done before the mapping is dropped and the lease released
                torch.cuda.current_stream(device).synchronize()
        del mapped
        return result

    def _release(self, channel: grpc.aio.Channel, peer: str, lease_id: str) -> None:
        """Tell the peer to free the lease, without waiting (the lease expires if this fails)."""
        release = channel.unary_unary(IPC_RELEASE_METHOD,
                                      request_serializer=kvtransfer_pb2.IpcReleaseRequest.SerializeToString,
                                      response_deserializer=kvtransfer_pb2.IpcReleaseResponse.FromString)

        async def call() -> None:
            try:
                await release(kvtransfer_pb2.IpcReleaseRequest(lease_id=lease_id), timeout=RELEASE_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                logger.info("releasing IPC lease %s at %s failed (%s); it expires on its own", lease_id, peer,
                            e.code().name)

        task = asyncio.ensure_future(call())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def close(self) -> None:
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
