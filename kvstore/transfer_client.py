"""The client of node-to-node KV transfer: `TransferClient` (one per process: channels, data
connections and torch.distributed pairs per peer) and `fetch_kv` over the gRPC `Fetch` stream.
The wire formats, the transports and the validation rules are described in kvstore/transfer.py,
which holds the server side (`KVTransferService`, `serve_transfer`)."""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import grpc
import numpy as np
import torch

from kvstore.codec import KVLayout, checksum
from kvstore.transfer import DEFAULT_CHUNK_BYTES, GRPC_OPTIONS, MAX_CHUNK_BYTES, SERVICE_NAME, FETCH_METHOD
from kvstore.transfer_source import (TransferError, check_fetch_args, empty_entries, layer_geometry,
                                     layout_from_proto, layout_to_proto, short_message)
from kvstore.transfer_wire import decode_response
from kvweave.cluster_secret import ClusterSecret, client_interceptors
from kvweave.v1 import kvtransfer_pb2

logger = logging.getLogger(__name__)


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


TRANSPORTS = ("auto", "tcp", "grpc", "dist", "ipc")
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
      peer that does not serve it (DistConnect UNIMPLEMENTED);
    - "ipc": through memory both processes map (kvstore.ipc_transfer), for a peer on this node
      only; the entries arrive on `ipc_device` (a GPU worker's KV device: CUDA IPC, GPU to GPU).

    Reuses one grpc.aio channel per address and up to `max_idle_connections` data connections per
    peer (for at most `max_channels` addresses, least recently used closed first). Channels,
    connections and pairs belong to the event loop that created them.

    `secret`: the cluster secret (None: an open cluster); its gRPC calls then carry the cluster
    credential and its data connections pass the data plane's handshake."""

    def __init__(self, max_channels: int = 64, transport: str = "auto", max_idle_connections: int = 4,
                 dist_backend: str = "gloo", secret: ClusterSecret | None = None,
                 ipc_device: torch.device | str = "cpu") -> None:
        from kvstore.dist_client import DistClient
        from kvstore.ipc_transfer import IpcClient
        from kvstore.tcp_client import KVDataClient

        if max_channels <= 0:
            raise ValueError("max_channels must be positive")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.max_channels = max_channels
        self.transport = transport
        self.secret = secret
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task] = set()
        self._data_ports: OrderedDict[str, int] = OrderedDict()  # address -> data port (0: none)
        self.data_client = KVDataClient(max_peers=max_channels, max_idle_per_peer=max_idle_connections,
                                        key=secret.derive("kv-data-plane") if secret else None)
        self.dist_client = DistClient(dist_backend, max_peers=max_channels)
        self.ipc_client = IpcClient(ipc_device)

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is not None:
            self._channels.move_to_end(address)
            return channel
        channel = self._channels[address] = grpc.aio.insecure_channel(
            address, options=GRPC_OPTIONS, interceptors=client_interceptors(self.secret) if self.secret else None)
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
        if self.transport == "ipc":
            return await self.ipc_client.fetch_kv(self.channel(address), address, keys, layout, timeout_s, out)
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
        await self.ipc_client.close()
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
