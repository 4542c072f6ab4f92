"""The client end of the raw TCP KV data plane: `KVDataClient` fetches KV from peers'
`KVDataServer`s (kvstore/tcp_transfer.py, which documents the checks; the wire format is kvstore/tcp_wire.py),
pooling connections per data address.
"""
from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict

import numpy as np
import torch

from kvstore.codec import DTYPE_CODES, MAX_DIMS, KVLayout, checksum
from kvstore.tcp_wire import (HEADER, KEEP_BUFFER_BYTES, LAYER, LAYER_MAGIC, MAX_ERROR_MESSAGE_BYTES, PROTOCOL_VERSION,
                              RESPONSE_MAGIC, STATUS_NAMES, STATUS_OK, ConnectionClosed, HandshakeError,
                              client_handshake, encode_request, pack_shape, recv_exactly, split_host_port)
from kvstore.transfer_source import (TransferError, check_fetch_args, empty_entries, empty_layer_major, layer_geometry,
                                     layout_from_code, short_message)


class DataPlaneUnreachableError(TransferError):
    """No connection could be opened to the peer's data port (it may have restarted elsewhere)."""


class _Connection:
    __slots__ = ("sock", "staging", "head")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.staging: np.ndarray | None = None  # uint8, reused for every layer (and fetch, if small)
        self.head = bytearray(max(HEADER.size, LAYER.size))

    def staging_for(self, nbytes: int) -> np.ndarray:
        if self.staging is None or len(self.staging) < nbytes:
            self.staging = np.empty(nbytes, dtype=np.uint8)
        return self.staging[:nbytes]

    def reusable(self) -> bool:
        """Open, and nothing unread on it (a peer that sent more than its answer, or closed)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # b"": closed; data: out of step
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            pass
        return False

    def close(self) -> None:
        self.sock.close()


class KVDataClient:
    """Fetches KV from peers' data servers, keeping up to `max_idle_per_peer` open connections per
    data address (for at most `max_peers` addresses, least recently used dropped first). Used by
    `TransferClient`; use it directly given a data address ("host:port" of a KVDataServer). `key`: the
    data plane's sub-key of the cluster secret, for the handshake of each new connection."""

    def __init__(self, max_peers: int = 64, max_idle_per_peer: int = 4, key: bytes | None = None) -> None:
        if max_peers <= 0 or max_idle_per_peer < 0:
            raise ValueError("max_peers must be positive and max_idle_per_peer not negative")
        self.max_peers = max_peers
        self.max_idle_per_peer = max_idle_per_peer
        self.key = key
        self._idle: OrderedDict[str, list[_Connection]] = OrderedDict()

    def idle_connections(self, address: str) -> int:
        return len(self._idle.get(address, ()))

    def _take(self, address: str) -> _Connection | None:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
            conn.close()
        return None

    def _give_back(self, address: str, conn: _Connection) -> None:
        idle = self._idle.setdefault(address, [])
        self._idle.move_to_end(address)
        if len(idle) >= self.max_idle_per_peer or not conn.reusable():
            conn.close()
        else:
            idle.append(conn)
        while len(self._idle) > self.max_peers:
            _, old = self._idle.popitem(last=False)
            for c in old:
                c.close()

    async def _connect(self, loop, address: str, peer: str) -> _Connection:
        try:
            host, port = split_host_port(address)
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as e:
            raise DataPlaneUnreachableError(f"KV fetch from {peer}: cannot resolve data address {address}: "
                                            f"{short_message(e)}") from None
        error: BaseException | None = None
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, sockaddr)
                if self.key is not None:
                    await self._handshake(loop, sock, peer)
                return _Connection(sock)
            except OSError as e:
                sock.close()
                error = e
            except BaseException:
                sock.close()
                raise
        raise DataPlaneUnreachableError(f"KV fetch from {peer}: cannot connect to data address {address}: "
                                        f"{short_message(error or 'no address')}")

    async def _handshake(self, loop, sock: socket.socket, peer: str) -> None:
        try:
            await client_handshake(loop, sock, self.key)
        except HandshakeError as e:
            raise TransferError(f"KV fetch from {peer}: {e}") from None
        except ConnectionClosed:
            raise TransferError(f"KV fetch from {peer}: the data server closed the connection during the handshake "
                                f"(it holds another cluster secret, or none)") from None

    async def fetch_kv(self, address: str, keys: list[bytes], layout: KVLayout, timeout_s: float,
                       out: torch.Tensor | None = None, *, peer: str | None = None) -> torch.Tensor:
        """[n, *layout.shape]: the entries of the leading n of `keys` held by the data server at
        `address`, every byte verified, within `timeout_s` for the whole call (connecting
        included). Raises TransferError naming `peer` (default: `address`); ValueError for bad
        arguments. `out` as for `TransferClient.fetch_kv`."""
        keys = list(keys)
        check_fetch_args(keys, layout, timeout_s, out)
        peer = peer or address
        if not keys:
            return torch.empty((0, *layout.shape), dtype=layout.dtype) if out is None else out[:0]
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                conn = self._take(address) or await self._connect(loop, address, peer)
                result = await _Exchange(conn, peer, keys, layout, out).run(loop)
        except BaseException as e:
            if conn is not None:
                conn.close()
            if isinstance(e, TimeoutError) and deadline.expired():
                raise TransferError(f"KV fetch from {peer}: no complete answer within the {timeout_s:.3g} s "
                                    f"deadline") from None
            if isinstance(e, OSError):
                raise TransferError(f"KV fetch from {peer}: connection to {address} failed: {short_message(e)}") from None
            raise
        if conn.staging is not None and len(conn.staging) > KEEP_BUFFER_BYTES:
            conn.staging = None
        self._give_back(address, conn)
        return result

    async def close(self) -> None:
        idle, self._idle = self._idle, OrderedDict()
        for conns in idle.values():
            for conn in conns:
                conn.close()


class _Exchange:
    """One request and its checked answer on one connection."""

    def __init__(self, conn: _Connection, peer: str, keys: list[bytes], layout: KVLayout,
                 out: torch.Tensor | None) -> None:
        self.conn, self.peer, self.keys, self.layout, self.given_out = conn, peer, keys, layout, out
        self.n_layers, self.rows_per_entry, self.row_bytes = layer_geometry(layout)
        self.layer = 0
        self.what = "the header"

    def fail(self, problem: str) -> TransferError:
        return TransferError(f"KV fetch from {self.peer}: {problem}")

    async def _recv(self, loop, view: memoryview) -> None:
        try:
            await recv_exactly(loop, self.conn.sock, view)
        except ConnectionClosed as e:
            raise self.fail(f"the connection closed during {self.what} ({e.got} of {len(view)} bytes)") from None

    async def run(self, loop) -> torch.Tensor:
        conn, layout = self.conn, self.layout
        await loop.sock_sendall(conn.sock, encode_request(self.keys, layout))
        head = memoryview(conn.head)[:HEADER.size]
        await self._recv(loop, head)
        magic, version, status, dtype, ndim, *rest = HEADER.unpack(head)
        shape, value = rest[:MAX_DIMS], rest[MAX_DIMS]
        if magic != RESPONSE_MAGIC:
            raise self.fail("the answer is not a KV data header (bad magic)")
        if version != PROTOCOL_VERSION:
            raise self.fail(f"answered with protocol version {version}, not {PROTOCOL_VERSION}")
        if status != STATUS_OK:
            if value > MAX_ERROR_MESSAGE_BYTES:
                raise self.fail(f"status {status} with an error message of {value} bytes")
            message = bytearray(value)
            self.what = "the error message"
            await self._recv(loop, memoryview(message))
            name = STATUS_NAMES.get(status, f"status {status}")
            raise self.fail(f"{name}: {short_message(message.decode('utf-8', 'replace') or 'no details')}")
        n = value
        if n > len(self.keys):
            raise self.fail(f"announced {n} entries for {len(self.keys)} requested keys")
        if dtype != DTYPE_CODES[layout.dtype] or ndim != len(layout.shape) or tuple(shape) != pack_shape(layout):
            try:
                announced = str(layout_from_code(dtype, shape[:ndim])) if ndim <= MAX_DIMS else None
            except ValueError:
                announced = None
            raise self.fail(f"announced layout {announced or f'(dtype {dtype}, dims {list(shape)[:ndim]})'}, "
                            f"requested {layout}")
        if n == 0:
            return empty_entries(0, layout) if self.given_out is None else self.given_out[:0]
        rows = n * self.rows_per_entry
        layer_bytes = rows * self.row_bytes
        if self.given_out is None:  # received in place, layer by layer, into a layer-major tensor
            out = empty_layer_major(n, layout)
            layers = out.movedim(2, 0).view(torch.uint8).numpy().reshape(self.n_layers, layer_bytes)
            dst = staging = src = None
        else:
            out = self.given_out[:n]
            dst = out.view(torch.uint8).numpy().reshape(rows, self.n_layers, self.row_bytes)
            staging = conn.staging_for(layer_bytes)
            src = staging.reshape(rows, self.row_bytes)
        frame = memoryview(conn.head)[:LAYER.size]
        for layer in range(self.n_layers):
            self.what = f"the frame of layer {layer}"
            await self._recv(loop, frame)
            magic, index, length, data_checksum = LAYER.unpack(frame)
            if magic != LAYER_MAGIC:
                raise self.fail(f"layer {layer}: not a layer frame (bad magic)")
            if index != layer:
                raise self.fail(f"sent layer {index} while layer {layer} was expected")
            if length != layer_bytes:
                raise self.fail(f"layer {layer}: announced {length} bytes, the layer has {layer_bytes}")
            self.what = f"layer {layer}"
            data = memoryview(staging if dst is not None else layers[layer])
            await self._recv(loop, data)
            if checksum(data) != data_checksum:
                raise self.fail(f"layer {layer}: checksum mismatch")
            if dst is not None:
                np.copyto(dst[:, layer], src)  # numpy: torch's threads are slower on busy cores
        return out
