"""Node-to-node KV transfer: the gRPC service (`kvweave.v1.KVTransfer`, proto/kvweave/v1/kvtransfer.proto)
and `TransferClient`, which fetches over a peer's raw TCP data plane (kvstore/tcp_transfer.py, tcp_client.py: the
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
--metrics transfer_node_to_node`, noisy shared cores); it exists for the GPU path (NCCL).

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

Copies. Data messages are encoded by hand and decoded in place (kvstore/transfer_wire.py); the
layouts, sources and layer gathering both transports share are in kvstore/transfer_source.py. Pieces are written straight into the
preallocated output through a uint8 view. Both ends use `GRPC_OPTIONS` (message-size limits): a
server that adds `KVTransferService` (with `add_to_server`) should be created with them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import torch

from kvstore.codec import KVLayout, checksum
from kvstore.keys import HASH_BYTES
from kvstore.transfer_source import (DEFAULT_MAX_KEYS, KVSource, LayerGather, TransferError, check_fetch_args,
                                     empty_entries, export_entries, layer_geometry, layout_from_proto,
                                     layout_to_proto, short_message)
from kvstore.transfer_wire import decode_response, encode_chunk, proto_chunk, serialize_response
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
    `on_served(nbytes, seconds)`: called after each fetch answered in full (KV bytes sent, time
    from the request to the last piece)."""

    def __init__(self, source: KVSource, data_server=None, max_keys: int = DEFAULT_MAX_KEYS,
                 dist_server=None,
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

    def __init__(self, grpc_server: grpc.aio.Server, port: int, data_server=None, dist_server=None) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.data_server = data_server
        self.dist_server = dist_server

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

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.grpc_server.wait_for_termination(timeout)


async def serve_transfer(source: KVSource, host: str = "127.0.0.1", port: int = 0, data_plane: bool = True,
                         dist: bool = True, **service_kwargs) -> tuple[TransferServer, int]:
    """(started TransferServer, bound gRPC port): a grpc.aio server with only a KVTransferService
    over `source` and, when `data_plane`, a KVDataServer on a free port of the same host that
    DataPort announces; when `dist`, a DistServer on `host` (opening its store at the first
    DistConnect). `await server.stop(grace)` stops them all."""
    from kvstore.dist_transfer import DistServer

    data_server = dist_server = None
    if data_plane:
        from kvstore.tcp_transfer import KVDataServer

        data_server = KVDataServer(source, host, max_keys=service_kwargs.get("max_keys", DEFAULT_MAX_KEYS))
        await data_server.start()
    try:
        if dist:
            dist_server = DistServer(source, host, on_served=service_kwargs.get("on_served"))
        server = grpc.aio.server(options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)])
        KVTransferService(source, data_server, dist_server=dist_server, **service_kwargs).add_to_server(server)
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
    return TransferServer(server, bound, data_server, dist_server), bound


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------

_KIND_NAMES = {"header": "a header", "chunk": "a data piece", "empty": "an empty message"}


class _Receiver:
    """Checks each message of a Fetch stream and writes its data into the preallocated output."""

    def __init__(self, peer: str, requested: int, layout: KVLayout, out: torch.Tensor | None) -> None:
        self.peer = peer
        self.requested = requested
        self.layout = layout
        self.given_out = out
        self.n_layers, self.rows_per_entry, self.row_bytes = layer_geometry(layout)
        self.out: torch.Tensor | None = None
        self.rows: np.ndarray | None = None  # uint8 view of out: [n * shape[0], n_layers, row_bytes]
        self.layer_bytes = 0
        self.layer = 0
        self.received = 0  # bytes of the current layer

    def fail(self, problem: str) -> TransferError:
        return TransferError(f"KV fetch from {self.peer}: {problem}")

    def receive(self, buf: bytes) -> None:
        try:
            msg = decode_response(buf)
        except ValueError as e:
            raise self.fail(f"malformed message: {e}") from None
        if self.out is None:
            if msg[0] != "header":
                raise self.fail(f"the first message is {_KIND_NAMES[msg[0]]}, not the header")
            self._header(msg[1])
        elif msg[0] != "chunk":
            raise self.fail(f"sent {_KIND_NAMES[msg[0]]} after the header")
        else:
            self._chunk(buf, *msg[1:])

    def _header(self, header: kvtransfer_pb2.FetchHeader) -> None:
        n = header.num_entries
        if n > self.requested:
            raise self.fail(f"announced {n} entries for {self.requested} requested keys")
        try:
            layout = layout_from_proto(header.layout)
        except ValueError as e:
            raise self.fail(f"announced an invalid layout: {e}") from None
        if layout != self.layout:
            raise self.fail(f"announced layout {layout}, requested {self.layout}")
        if self.given_out is None:
            self.out = empty_entries(n, self.layout)
        else:
            self.out = self.given_out[:n]
        if n:
            self.rows = self.out.view(torch.uint8).numpy().reshape(n * self.rows_per_entry, self.n_layers,
                                                                    self.row_bytes)
            self.layer_bytes = n * self.rows_per_entry * self.row_bytes
        else:
            self.layer = self.n_layers  # nothing follows

    def _chunk(self, buf: bytes, layer: int, offset: int, span: tuple[int, int], data_checksum: int) -> None:
        if self.layer >= self.n_layers:
            raise self.fail(f"sent data for layer {layer} after the last layer was complete")
        if layer != self.layer:
            raise self.fail(f"sent layer {layer} while layer {self.layer} was incomplete "
                            f"({self.received} of {self.layer_bytes} bytes)")
        size = span[1] - span[0]
        if offset != self.received:
            raise self.fail(f"layer {layer}: piece at offset {offset}, expected {self.received}")
        if size == 0 or offset + size > self.layer_bytes:
            raise self.fail(f"layer {layer}: a piece of {size} bytes at offset {offset} "
                            f"does not fit the layer's {self.layer_bytes} bytes")
        if checksum(memoryview(buf)[span[0]:span[1]]) != data_checksum:
            raise self.fail(f"layer {layer}: checksum mismatch in the piece at offset {offset}")
        self._write(np.frombuffer(buf, dtype=np.uint8, count=size, offset=span[0]), offset)
        self.received += size
        if self.received == self.layer_bytes:
            self.layer += 1
            self.received = 0

    def _write(self, src: np.ndarray, offset: int) -> None:
        """Copy `src` (bytes [offset, offset + len) of the current layer) into the output."""
        dst, rb = self.rows[:, self.layer, :], self.row_bytes
        row, col = divmod(offset, rb)
        pos, size = 0, len(src)
        if col:
            k = min(rb - col, size)
            dst[row, col:col + k] = src[:k]
            pos, row = k, row + 1
        full = (size - pos) // rb
        if full:
            dst[row:row + full] = src[pos:pos + full * rb].reshape(full, rb)
            pos, row = pos + full * rb, row + full
        if pos < size:
            dst[row, :size - pos] = src[pos:]

    def result(self) -> torch.Tensor:
        if self.out is None:
            raise self.fail("the stream ended without a header")
        if self.layer < self.n_layers:
            raise self.fail(f"the stream ended at layer {self.layer} of {self.n_layers} "
                            f"({self.received} of {self.layer_bytes} bytes of it)")
        return self.out


def _check_args(keys: list[bytes], layout: KVLayout, timeout_s: float, max_chunk_bytes: int,
                out: torch.Tensor | None) -> None:
    check_fetch_args(keys, layout, timeout_s, out)
    if not 0 <= max_chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"max_chunk_bytes must be in [0, {MAX_CHUNK_BYTES}], got {max_chunk_bytes}")


async def _fetch(channel: grpc.aio.Channel, peer: str, keys: list[bytes], layout: KVLayout, timeout_s: float,
                 max_chunk_bytes: int, out: torch.Tensor | None) -> torch.Tensor:
    keys = list(keys)
    _check_args(keys, layout, timeout_s, max_chunk_bytes, out)
    if not keys:
        return torch.empty((0, *layout.shape), dtype=layout.dtype) if out is None else out[:0]
    request = kvtransfer_pb2.FetchRequest(keys=keys, layout=layout_to_proto(layout), max_chunk_bytes=max_chunk_bytes)
    receiver = _Receiver(peer, len(keys), layout, out)
    # Raw responses (no deserializer): decode_response reads the data in place.
    method = channel.unary_stream(FETCH_METHOD, request_serializer=kvtransfer_pb2.FetchRequest.SerializeToString,
                                  response_deserializer=None)
    call = method(request, timeout=timeout_s)
    try:
        async for buf in call:
            receiver.receive(buf)
        return receiver.result()
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise receiver.fail(f"no complete answer within the {timeout_s:g} s deadline") from None
        raise receiver.fail(f"{e.code().name}: {short_message(e.details() or 'no details')}") from None
    except BaseException:  # a protocol violation, a cancellation: stop the peer's stream
        call.cancel()
        raise


def _channel_target(channel: grpc.aio.Channel) -> str:
    try:  # grpc.aio exposes no public accessor for the target
        target = channel._channel.target
        return target.decode() if isinstance(target, bytes) else str(target)
    except Exception:
        return "the peer"


TRANSPORTS = ("auto", "tcp", "grpc", "dist")
DATA_PORT_METHOD = f"/{SERVICE_NAME}/DataPort"
RELEASE_METHOD = f"/{SERVICE_NAME}/Release"


def _data_host(address: str) -> str | None:
    """The host of a plain "host:port" / "[v6]:port" gRPC address, bracketed for an IPv6 literal;
    None for other target forms (a scheme, a unix socket), which are fetched over gRPC."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in address or host in ("unix", "unix-abstract"):
        return None
    return host


class TransferClient:
    """Fetches KV from peers by their gRPC address, over the peer's TCP data plane
    (kvstore.tcp_transfer) or the gRPC Fetch stream:

    - transport "auto" (default): asks the peer's `DataPort` once per address (the answer is cached)
      and fetches over TCP when it has a data plane, else (DataPort answers 0 or UNIMPLEMENTED) over gRPC;
    - "tcp": over the data plane only (TransferError for a peer without one);
    - "grpc": over the Fetch stream only;
    - "dist": over a torch.distributed pair of this process and the peer's (`dist_backend`, gloo
      on the CPU; kvstore.dist_transfer), built on first use and cached; TransferError for a
      peer that does not serve it (DistConnect UNIMPLEMENTED).

    Reuses one grpc.aio channel per address and up to `max_idle_connections` data connections per
    peer (for at most `max_channels` addresses, least recently used closed first). Channels,
    connections and pairs belong to the event loop that created them."""

    def __init__(self, max_channels: int = 64, transport: str = "auto", max_idle_connections: int = 4,
                 dist_backend: str = "gloo") -> None:
        from kvstore.dist_client import DistClient
        from kvstore.tcp_client import KVDataClient

        if max_channels <= 0:
            raise ValueError("max_channels must be positive")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.max_channels = max_channels
        self.transport = transport
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task] = set()
        self._data_ports: OrderedDict[str, int] = OrderedDict()  # address -> data port (0: none)
        self.data_client = KVDataClient(max_peers=max_channels, max_idle_per_peer=max_idle_connections)
        self.dist_client = DistClient(dist_backend, max_peers=max_channels)

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is not None:
            self._channels.move_to_end(address)
            return channel
        channel = self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        while len(self._channels) > self.max_channels:
            _, old = self._channels.popitem(last=False)
            task = asyncio.ensure_future(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return channel

    async def data_address(self, address: str, timeout_s: float) -> str | None:
        """"host:port" of the data plane of the peer at `address` (None: it has none), asked with
        `DataPort` the first time and cached. TransferError when the peer cannot be asked."""
        port = self._data_ports.get(address)
        host = _data_host(address)
        if port is None and host is not None:
            method = self.channel(address).unary_unary(
                DATA_PORT_METHOD, request_serializer=kvtransfer_pb2.DataPortRequest.SerializeToString,
                response_deserializer=kvtransfer_pb2.DataPortResponse.FromString)
            try:
                port = (await method(kvtransfer_pb2.DataPortRequest(), timeout=timeout_s)).port
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    problem = (f"no complete answer within the {timeout_s:.3g} s deadline"
                               if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                               else f"{e.code().name}: {short_message(e.details() or 'no details')}")
                    raise TransferError(f"KV fetch from {address}: asking for its data port: {problem}") from None
                port = 0
            self._data_ports[address] = port
            while len(self._data_ports) > self.max_channels:
                self._data_ports.popitem(last=False)
        if port:
            self._data_ports.move_to_end(address)
            return f"{host}:{port}"
        return None

    async def fetch_kv(self, address: str, keys: list[bytes], layout: KVLayout, timeout_s: float,
                       max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, *layout.shape]: the entries of the leading n of `keys` that the peer at `address` (its
        gRPC address) holds (n may be 0), every byte verified, within `timeout_s` for the whole call.
        Raises TransferError (ValueError for bad arguments).

        `out`: a contiguous CPU tensor [>= len(keys), *layout.shape] to receive into (a reused
        staging buffer saves faulting in fresh memory); the result is then out[:n]. After a
        TransferError its contents are unspecified. `max_chunk_bytes`: the gRPC transport's piece
        size (the data plane and the dist transport send whole layers)."""
        keys = list(keys)
        _check_args(keys, layout, timeout_s, max_chunk_bytes, out)
        if not keys:
            return torch.empty((0, *layout.shape), dtype=layout.dtype) if out is None else out[:0]
        if self.transport == "dist":
            return await self.dist_client.fetch_kv(self.channel(address), address, keys, layout, timeout_s, out)
        if self.transport != "grpc":
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            data_address = await self.data_address(address, timeout_s)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransferError(f"KV fetch from {address}: no complete answer within the {timeout_s:g} s deadline")
            if data_address is not None:
                from kvstore.tcp_client import DataPlaneUnreachableError

                try:
                    return await self.data_client.fetch_kv(data_address, keys, layout, remaining, out, peer=address)
                except DataPlaneUnreachableError:
                    self._data_ports.pop(address, None)  # ask again next time: the peer may have restarted
                    raise
            if self.transport == "tcp":
                raise TransferError(f"KV fetch from {address}: the peer has no TCP data plane")
            timeout_s = remaining
        return await _fetch(self.channel(address), address, keys, layout, timeout_s, max_chunk_bytes, out)

    async def release(self, address: str, handoff_id: str, timeout_s: float) -> bool:
        """Ask the peer at `address` to free a handoff's blocks; whether it held them. TransferError
        when it cannot be asked."""
        method = self.channel(address).unary_unary(
            RELEASE_METHOD, request_serializer=kvtransfer_pb2.ReleaseRequest.SerializeToString,
            response_deserializer=kvtransfer_pb2.ReleaseResponse.FromString)
        try:
            return (await method(kvtransfer_pb2.ReleaseRequest(handoff_id=handoff_id), timeout=timeout_s)).found
        except grpc.aio.AioRpcError as e:
            raise TransferError(f"releasing handoff {handoff_id} at {address}: {e.code().name}: "
                                f"{short_message(e.details() or 'no details')}") from None

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), OrderedDict()
        self._data_ports.clear()
        await self.data_client.close()
        await self.dist_client.close()
        await asyncio.gather(*(c.close() for c in channels), *self._closing, return_exceptions=True)


async def fetch_kv(channel_or_address: grpc.aio.Channel | str, keys: list[bytes], layout: KVLayout,
                   timeout_s: float, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """`TransferClient.fetch_kv` over gRPC only (the Fetch stream), over a given channel (create it
    with GRPC_OPTIONS) or, given an address, over a channel opened for this call only."""
    if isinstance(channel_or_address, str):
        async with grpc.aio.insecure_channel(channel_or_address, options=GRPC_OPTIONS) as channel:
            return await _fetch(channel, channel_or_address, keys, layout, timeout_s, max_chunk_bytes, out)
    return await _fetch(channel_or_address, _channel_target(channel_or_address), keys, layout, timeout_s,
                        max_chunk_bytes, out)
