"""Node-to-node KV transfer: the gRPC service (`kvweave.v1.KVTransfer`, proto/kvweave/v1/kvtransfer.proto)
and `TransferClient` (kvstore/transfer_client.py), which fetches over a peer's raw TCP data plane (kvstore/tcp_transfer.py, tcp_client.py: the
default; ~2.5x the throughput of the gRPC stream here), over the gRPC `Fetch` stream described here, or over a
torch.distributed pair (kvstore/dist_transfer.py, dist_client.py).

Transports. A peer serves `KVTransfer` on its one advertised address; `DataPort` answers the port
of its `KVDataServer` on the same host (0: none). `TransferClient(transport="auto")` asks once per
address, caches the port and fetches over TCP, falling back to `Fetch` when the peer has no data
plane (DataPort answers 0 or UNIMPLEMENTED). Both transports carry the same layer-major data,
answer the same errors (named by the same gRPC status names) and are checked as strictly.
`serve_transfer` starts both servers; a worker adds `KVTransferService(source, data_server)` to its
own grpc.aio server.

The third transport, `TransferClient(transport="dist")`, moves the same layer-major bytes over
torch.distributed point-to-point sends (gloo on the CPU; the backend is a parameter, for NCCL on
GPUs). No global process group exists: each (client process, server process) pair builds its own
two-rank group on first use, through a rendezvous the client asks for with `DistConnect` (the
server answers its TCPStore and a pair id; the open stream is the pair's lifetime on both
sides), and caches it. `DistFetch` carries the keys and layout over gRPC, validated and refused
with the same statuses; its answer gives n and each layer's XXH3-64, and the layers follow as
sends tagged per fetch, so concurrent fetches on one pair never mix. Blocking group calls run in
threads with the call's deadline as their timeout; any failure raises `TransferError` and drops
the pair, and the next fetch builds a new one. A service built with `dist_server` serves it (a
worker always does); without one DistConnect is UNIMPLEMENTED and the client says the peer does
not serve the transport. Over loopback on this 2-vCPU VM it moved 64 MiB at 1.0-2.4 GB/s
against the TCP data plane's 1.5-3.1 and the gRPC stream's 0.6-1.0 (`kvweave bench kvstore
--metrics transfer_node_to_node`, noisy shared cores); it exists for the GPU path: GPU workers
pair over NCCL (kvstore/dist_group.py says how NCCL differs: one fetch at a time per pair, no
checksums, entries exported and received in device memory).

The fourth, `TransferClient(transport="ipc")`, is for processes of one node (kvstore/ipc_transfer.py):
`IpcFetch` answers a handle to the exported entries' memory (a shared-memory file, or CUDA IPC of
device memory between GPU workers), which the client maps and copies from, then `IpcRelease`.

Handoffs. A prefill worker holds a prefilled prompt's blocks under the keys of a handoff handle
(worker/kv_handoff.py); its source exports them like any other key, so both transports fetch
them unchanged. `Release` (with the service's `on_release`) frees a handoff once the decode worker
has its KV; `TransferClient.release` calls it.

Fetch wire format. The caller sends the keys it wants (16-byte block hashes, in prompt order), the
layout it expects (dtype code and entry shape; dim 1 is the layer) and a maximum piece size. The
server streams back a `FetchHeader` (n, the length of the leading run of requested keys it holds:
it stops at the first it lacks; and the layout), then the data layer by layer: layer l is the n
entries' slices [:, :, l] stacked as [n, shape[0], *shape[2:]], contiguous, cut into `LayerChunk`s
of at most max_chunk_bytes, each carrying its layer, its byte offset within the layer and the
XXH3-64 of its data. Layers go in order, the pieces of a layer in offset order. The server gathers
a layer only when it is about to send it and yields one piece at a time, so HTTP/2 flow control
bounds its memory.

Validation. The server answers INVALID_ARGUMENT to a malformed request (a key that is not 16
bytes, more than `max_keys` keys, an unknown dtype, a shape without a layer dim) and
FAILED_PRECONDITION when it holds entries of another layout. The client (`fetch_kv`) checks
everything it receives: the first message is a header announcing at most the requested count and
exactly the requested layout; each piece belongs to the layer being received (layers strictly in
order), starts where the previous piece ended, fits in the layer and matches its checksum; the
stream ends exactly when the last layer is complete. Any violation, gRPC error or the deadline of
the whole call raises `TransferError` naming the peer: partial or unverified KV is never returned.

Authentication. With a cluster secret (kvweave/cluster_secret.py) every KVTransfer call needs the
cluster credential (UNAUTHENTICATED otherwise; the server interceptor refuses it before parsing
the request), and a data connection passes a challenge-response handshake before any block
(kvstore/tcp_wire.py). The dist transport's rendezvous (`DistConnect`) is an authenticated gRPC
call, but the gloo TCPStore and pair connections it opens are not authenticated by gloo itself.

Copies. Data messages are encoded by hand and decoded in place (kvstore/transfer_wire.py); the
layouts, sources and layer gathering both transports share are in kvstore/transfer_source.py. Pieces are written straight into the
preallocated output through a uint8 view. Both ends use `GRPC_OPTIONS` (message-size limits): a
server that adds `KVTransferService` (with `add_to_server`) should be created with them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from kvstore.codec import KVLayout
from kvstore.keys import HASH_BYTES
from kvstore.transfer_source import (DEFAULT_MAX_KEYS, KVSource, LayerGather, export_entries, layout_from_proto,
                                     layout_to_proto, short_message)
from kvstore.transfer_wire import encode_chunk, proto_chunk, serialize_response
from kvweave.cluster_secret import ClusterSecret, server_interceptors
from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""gRPC send/receive limit on both ends."""
MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
"""Largest data piece (leaves room for the message's other fields)."""
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024 - 4096
"""4 MiB less room for the framing: a piece fits gRPC's default 4 MiB receive limit even on a channel
created without GRPC_OPTIONS."""
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
"""Channel/server options for KV transfer (servers adding KVTransferService should use them)."""
SERVICE_NAME = kvtransfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name
FETCH_METHOD = f"/{SERVICE_NAME}/Fetch"

class KVTransferService(kvtransfer_pb2_grpc.KVTransferServicer):
    """`kvweave.v1.KVTransfer` over a KVSource. Add it with `add_to_server`, which serves data
    messages encoded by `encode_chunk`; the generated `add_KVTransferServicer_to_server` works too,
    with `Fetch` building protobuf messages (the same bytes on the wire, three more copies).

    `data_server`: the started KVDataServer (kvstore.tcp_transfer) over the same source, whose port
    `DataPort` announces so that clients fetch over TCP; None: DataPort answers 0 (Fetch only).
    `dist_server`: the DistServer (kvstore.dist_transfer) over the same source that answers
    `DistConnect` and `DistFetch`; None: they answer UNIMPLEMENTED.
    `ipc_server`: the IpcServer (kvstore.ipc_transfer) over the same source that answers
    `IpcFetch` and `IpcRelease`; None: they answer UNIMPLEMENTED.
    `on_served(nbytes, seconds)`: called after each fetch answered in full (KV bytes sent, time
    from the request to the last piece)."""

    def __init__(self, source: KVSource, data_server=None, max_keys: int = DEFAULT_MAX_KEYS,
                 dist_server=None, ipc_server=None,
                 default_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 on_served: Callable[[int, float], None] | None = None,
                 on_release: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """`on_release(handoff_id)`: frees a handoff's blocks, True when it was held (None: this
        server holds no handoffs; Release answers found = false)."""
        if max_keys <= 0:
            raise ValueError("max_keys must be positive")
        if not 0 < default_chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"default_chunk_bytes must be in [1, {MAX_CHUNK_BYTES}]")
        self.source = source
        self.data_server = data_server
        self.dist_server = dist_server
        self.ipc_server = ipc_server
        self.max_keys = max_keys
        self.default_chunk_bytes = default_chunk_bytes
        self.on_served = on_served
        self.on_release = on_release

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Fetch": grpc.unary_stream_rpc_method_handler(
                self._fetch_encoded, request_deserializer=kvtransfer_pb2.FetchRequest.FromString,
                response_serializer=serialize_response),
            "DataPort": grpc.unary_unary_rpc_method_handler(
                self.DataPort, request_deserializer=kvtransfer_pb2.DataPortRequest.FromString,
                response_serializer=kvtransfer_pb2.DataPortResponse.SerializeToString),
            "Release": grpc.unary_unary_rpc_method_handler(
                self.Release, request_deserializer=kvtransfer_pb2.ReleaseRequest.FromString,
                response_serializer=kvtransfer_pb2.ReleaseResponse.SerializeToString),
            "DistConnect": grpc.unary_stream_rpc_method_handler(
                self.DistConnect, request_deserializer=kvtransfer_pb2.DistConnectRequest.FromString,
                response_serializer=kvtransfer_pb2.DistConnectResponse.SerializeToString),
            "DistFetch": grpc.unary_unary_rpc_method_handler(
                self.DistFetch, request_deserializer=kvtransfer_pb2.DistFetchRequest.FromString,
                response_serializer=kvtransfer_pb2.DistFetchResponse.SerializeToString),
            "IpcFetch": grpc.unary_unary_rpc_method_handler(
                self.IpcFetch, request_deserializer=kvtransfer_pb2.IpcFetchRequest.FromString,
                response_serializer=kvtransfer_pb2.IpcFetchResponse.SerializeToString),
            "IpcRelease": grpc.unary_unary_rpc_method_handler(
                self.IpcRelease, request_deserializer=kvtransfer_pb2.IpcReleaseRequest.FromString,
                response_serializer=kvtransfer_pb2.IpcReleaseResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    async def DataPort(self, request: kvtransfer_pb2.DataPortRequest, context: grpc.aio.ServicerContext
                       ) -> kvtransfer_pb2.DataPortResponse:
        return kvtransfer_pb2.DataPortResponse(port=self.data_server.port if self.data_server is not None else 0)

    async def Release(self, request: kvtransfer_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
                      ) -> kvtransfer_pb2.ReleaseResponse:
        if not request.handoff_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "handoff_id is empty")
        found = self.on_release is not None and await self.on_release(request.handoff_id)
        return kvtransfer_pb2.ReleaseResponse(found=found)

    async def DistConnect(self, request: kvtransfer_pb2.DistConnectRequest, context: grpc.aio.ServicerContext):
        if self.dist_server is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server has no torch.distributed transport")
        async for msg in self.dist_server.connect(request, context):
            yield msg

    async def DistFetch(self, request: kvtransfer_pb2.DistFetchRequest, context: grpc.aio.ServicerContext
                        ) -> kvtransfer_pb2.DistFetchResponse:
        if self.dist_server is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server has no torch.distributed transport")
        try:
            keys, layout, _ = self._parse(request.fetch)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, short_message(e))
        return await self.dist_server.fetch(request.pair_id, request.tag, keys, layout, context)

    async def IpcFetch(self, request: kvtransfer_pb2.IpcFetchRequest, context: grpc.aio.ServicerContext
                       ) -> kvtransfer_pb2.IpcFetchResponse:
        if self.ipc_server is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server has no IPC transport")
        try:
            keys, layout, _ = self._parse(request.fetch)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, short_message(e))
        return await self.ipc_server.fetch(request, keys, layout, context)

    async def IpcRelease(self, request: kvtransfer_pb2.IpcReleaseRequest, context: grpc.aio.ServicerContext
                         ) -> kvtransfer_pb2.IpcReleaseResponse:
        if self.ipc_server is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server has no IPC transport")
        if not request.lease_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lease_id is empty")
        return kvtransfer_pb2.IpcReleaseResponse(found=self.ipc_server.release(request.lease_id))

    def _parse(self, request: kvtransfer_pb2.FetchRequest) -> tuple[list[bytes], KVLayout, int]:
        keys = list(request.keys)
        if len(keys) > self.max_keys:
            raise ValueError(f"too many keys: {len(keys)} (at most {self.max_keys} per fetch)")
        for i, key in enumerate(keys):
            if len(key) != HASH_BYTES:
                raise ValueError(f"key {i} has {len(key)} bytes, keys are {HASH_BYTES}-byte block hashes")
        if not request.HasField("layout"):
            raise ValueError("request has no layout")
        layout = layout_from_proto(request.layout)
        chunk = min(request.max_chunk_bytes or self.default_chunk_bytes, MAX_CHUNK_BYTES)
        return keys, layout, chunk

    async def Fetch(self, request: kvtransfer_pb2.FetchRequest, context: grpc.aio.ServicerContext):
        async for msg in self._stream(request, context, proto_chunk):
            yield msg

    async def _fetch_encoded(self, request: kvtransfer_pb2.FetchRequest, context: grpc.aio.ServicerContext):
        async for msg in self._stream(request, context, encode_chunk):
            yield msg

    async def _stream(self, request: kvtransfer_pb2.FetchRequest, context: grpc.aio.ServicerContext, encode):
        t0 = time.perf_counter()
        try:
            keys, layout, chunk = self._parse(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, short_message(e))
        entries, error = await export_entries(self.source, keys, layout)
        if error is not None:
            await context.abort(grpc.StatusCode[error[0]], error[1])
        n = 0 if entries is None else entries.shape[0]
        yield kvtransfer_pb2.FetchResponse(
            header=kvtransfer_pb2.FetchHeader(num_entries=n, layout=layout_to_proto(layout)))
        if n:
            layers = LayerGather(entries)
            for layer in range(layout.shape[1]):
                data = layers.gather(layer)  # built now, when it is sent
                for offset in range(0, len(data), chunk):
                    yield encode(layer, offset, data[offset:offset + chunk])
        if self.on_served is not None:
            self.on_served(entries.numel() * entries.element_size() if n else 0, time.perf_counter() - t0)



class TransferServer:
    """What `serve_transfer` starts: a grpc.aio server with a KVTransferService and, unless
    disabled, the KVDataServer it announces and its DistServer. `stop` stops them all."""

    def __init__(self, grpc_server: grpc.aio.Server, port: int, data_server=None, dist_server=None,
                 ipc_server=None) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.data_server = data_server
        self.dist_server = dist_server
        self.ipc_server = ipc_server

    @property
    def data_port(self) -> int:
        return self.data_server.port if self.data_server is not None else 0

    async def stop(self, grace: float | None = None) -> None:
        """Stop the servers; responses in flight get up to `grace` seconds (None: none). Pairs of
        the dist transport are dropped at once (their streams would hold the grace period)."""
        if self.dist_server is not None:
            self.dist_server.close()
        stopping = [self.grpc_server.stop(grace)]
        if self.data_server is not None:
            stopping.append(self.data_server.stop(grace))
        await asyncio.gather(*stopping)
        if self.ipc_server is not None:  # leases die with the server: their clients' maps keep what they mapped
            self.ipc_server.close()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.grpc_server.wait_for_termination(timeout)


async def serve_transfer(source: KVSource, host: str = "127.0.0.1", port: int = 0, data_plane: bool = True,
                         dist: bool = True, ipc: bool = True, secret: ClusterSecret | None = None,
                         kv_device: str = "cpu", **service_kwargs) -> tuple[TransferServer, int]:
    """(started TransferServer, bound gRPC port): a grpc.aio server with only a KVTransferService
    over `source` and, when `data_plane`, a KVDataServer on a free port of the same host that
    DataPort announces; when `dist`, a DistServer on `host` (opening its store at the first
    DistConnect); when `ipc`, an IpcServer. `kv_device`: where the source's KV lives (a GPU: its
    IPC and NCCL peers get device memory). `await server.stop(grace)` stops them all. `secret`: the cluster secret (None: open): gRPC calls need its credential and data
    connections its handshake."""
    from kvstore.dist_transfer import DistServer
    from kvstore.ipc_transfer import IpcServer

    data_server = dist_server = None
    if data_plane:
        from kvstore.tcp_transfer import KVDataServer

        data_server = KVDataServer(source, host, max_keys=service_kwargs.get("max_keys", DEFAULT_MAX_KEYS),
                                   key=secret.derive("kv-data-plane") if secret else None)
        await data_server.start()
    try:
        if dist:
            dist_server = DistServer(source, host, on_served=service_kwargs.get("on_served"), device=kv_device)
        server = grpc.aio.server(options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)],
                                 interceptors=server_interceptors(secret) if secret else None)
        ipc_server = IpcServer(source, kv_device, on_served=service_kwargs.get("on_served")) if ipc else None
        KVTransferService(source, data_server, dist_server=dist_server, ipc_server=ipc_server,
                          **service_kwargs).add_to_server(server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise RuntimeError(f"cannot listen on {host}:{port}")
        await server.start()
    except BaseException:
        if data_server is not None:
            await data_server.stop()
        if dist_server is not None:
            dist_server.close()
        raise
    return TransferServer(server, bound, data_server, dist_server, ipc_server), bound
