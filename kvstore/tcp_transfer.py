"""Node-to-node KV transfer over a raw TCP data plane: the default transport for bulk KV.

gRPC (kvstore/transfer.py) stays the control plane and the fallback transport: a worker serves
`KVTransfer` on its advertised address, and `KVTransfer.DataPort` names the port of its
`KVDataServer` on the same host (0 when it has none). `TransferClient` asks once per address and
then fetches over TCP. This module holds the server; the wire format is kvstore/tcp_wire.py,
the client kvstore/tcp_client.py.

The server validates requests as the gRPC service does (same limits and messages) and answers
an error with a header; after a request it cannot resynchronise on (bad magic or version, too
many keys) it closes the connection. It gathers a layer only when it is about to send it, into
one buffer (kept for the connection's next request when it is small), and sends it without
further copies (`loop.sock_sendall` of a memoryview waits until the kernel took every byte): its
memory stays at one layer per connection.

The client (`KVDataClient.fetch_kv`, in kvstore/tcp_client.py) checks everything it receives, as the gRPC client does: a
header announcing at most the requested count and exactly the requested layout, layers strictly
in order, each of exactly the layer's length and matching its checksum. Every layer is received
with `loop.sock_recv_into` into a staging buffer kept with the connection (no bytes objects per
piece), verified, then copied into the preallocated output with numpy. Any violation, socket
error or the deadline of the whole call raises `TransferError` naming the peer, closes that
connection (a connection in an unknown state is never reused) and returns no partial KV.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

import numpy as np
import torch

from kvstore.codec import MAX_DIMS, KVLayout, checksum
from kvstore.keys import HASH_BYTES
from kvstore.tcp_wire import (KEEP_BUFFER_BYTES, LAYER, LAYER_MAGIC, PROTOCOL_VERSION, REQUEST, REQUEST_MAGIC,
                              ConnectionClosed, HandshakeError, encode_error, encode_header, recv_exactly,
                              server_handshake)
from kvstore.transfer_source import (DEFAULT_MAX_KEYS, KVSource, LayerGather, export_entries, layout_from_code,
                                     short_message)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------

class _BadRequest(Exception):
    """A malformed request: answered INVALID_ARGUMENT; `resync` says whether the connection can go on."""

    def __init__(self, message: str, resync: bool) -> None:
        super().__init__(message)
        self.resync = resync


class KVDataServer:
    """Serves a KVSource over the TCP data plane. `await start()` binds `host` (a free port by
    default) and returns the port; `await stop()` closes it. Give it to `KVTransferService`
    (`KVTransferService(source, data_server)`) so that `DataPort` tells clients where it is.
    `on_served(nbytes, seconds)`: called after each request answered in full (KV bytes sent, time
    from the request to the last byte). `key`: the data plane's sub-key of the cluster secret; with
    one, a connection must pass the handshake (kvstore/tcp_wire.py) before any request, and
    `num_refused` counts those that did not."""

    def __init__(self, source: KVSource, host: str = "127.0.0.1", port: int = 0, max_keys: int = DEFAULT_MAX_KEYS,
                 write_timeout_s: float = 60.0, backlog: int = 128,
                 on_served: Callable[[int, float], None] | None = None, key: bytes | None = None) -> None:
        if max_keys <= 0:
            raise ValueError("max_keys must be positive")
        if not write_timeout_s > 0:
            raise ValueError("write_timeout_s must be positive")
        self.source = source
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.requested_port = port
        self.max_keys = max_keys
        self.write_timeout_s = write_timeout_s
        self.backlog = backlog
        self.on_served = on_served
        self.key = key
        self.num_refused = 0
        self.port = 0
        """The bound port once started (0 before and after)."""
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._connections: dict[asyncio.Task, socket.socket] = {}
        self._busy: set[asyncio.Task] = set()  # connections answering a request
        self._idle_changed = asyncio.Event()
        self._stopping = False

    async def start(self) -> int:
        if self._listener is not None:
            raise RuntimeError("the KV data server is already started")
        self._stopping = False
        infos = socket.getaddrinfo(self.host or None, self.requested_port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        if not infos:
            raise OSError(f"cannot resolve {self.host!r}")
        if not self.host:  # every interface: one dual-stack socket where IPv6 is available
            infos.sort(key=lambda info: info[0] != socket.AF_INET6)
        family, type_, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not self.host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(self.backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept_loop(sock))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting and close idle connections; let the answers in flight finish for up to
        `grace` seconds (None or 0: abort them), then close every connection."""
        if self._listener is None:
            return
        listener, self._listener, self.port = self._listener, None, 0
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        listener.close()
        for task in self._connections:
            if task not in self._busy:
                task.cancel()
        if grace:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while self._busy and loop.time() < deadline:
                self._idle_changed.clear()
                try:
                    await asyncio.wait_for(self._idle_changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> "KVDataServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # e.g. out of file descriptors: keep serving the others
                logger.warning("KV data server: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve_connection(sock))
            self._connections[task] = sock
            task.add_done_callback(self._connection_done)

    def _connection_done(self, task: asyncio.Task) -> None:
        sock = self._connections.pop(task, None)
        if sock is not None:
            sock.close()
        self._busy.discard(task)
        self._idle_changed.set()

    async def _serve_connection(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        head = memoryview(bytearray(REQUEST.size))
        buffer: list[np.ndarray | None] = [None]  # the layer buffer, reused by the next request if small
        try:
            if self.key is not None and not await self._authenticate(loop, sock):
                return
            while not self._stopping:
                try:
                    await recv_exactly(loop, sock, head)
                except ConnectionClosed:
                    return  # the client is done (between requests) or gone
                self._busy.add(task)
                try:
                    if not await self._serve_request(loop, sock, head, buffer):
                        await self._linger(loop, sock)
                        return
                finally:
                    self._busy.discard(task)
                    self._idle_changed.set()
                    if buffer[0] is not None and len(buffer[0]) > KEEP_BUFFER_BYTES:
                        buffer[0] = None
        except (OSError, ConnectionClosed, TimeoutError) as e:  # the client went away or stopped reading
            logger.debug("KV data server: connection closed: %s", e)
        except Exception:
            logger.exception("KV data server: connection failed")

    async def _authenticate(self, loop, sock: socket.socket) -> bool:
        try:
            await server_handshake(loop, sock, self.key)
            return True
        except (HandshakeError, ConnectionClosed, TimeoutError) as e:
            self.num_refused += 1
            if self.num_refused == 1 or self.num_refused % 1000 == 0:
                logger.warning("KV data server: refused %d connection(s) without the cluster's credential (%s)",
                               self.num_refused, type(e).__name__)
            return False

    async def _read_request(self, loop, sock: socket.socket, head: memoryview) -> tuple[list[bytes], KVLayout]:
        magic, version, dtype, ndim, *rest = REQUEST.unpack(head)
        shape, n = rest[:MAX_DIMS], rest[MAX_DIMS]
        if magic != REQUEST_MAGIC:
            raise _BadRequest("not a KV data request (bad magic)", resync=False)
        if version != PROTOCOL_VERSION:
            raise _BadRequest(f"unsupported protocol version {version} (this server speaks {PROTOCOL_VERSION})",
                              resync=False)
        if n > self.max_keys:
            raise _BadRequest(f"too many keys: {n} (at most {self.max_keys} per fetch)", resync=False)
        data = bytearray(n * HASH_BYTES)
        await recv_exactly(loop, sock, memoryview(data))
        keys = [bytes(data[i:i + HASH_BYTES]) for i in range(0, len(data), HASH_BYTES)]
        if not 0 <= ndim <= MAX_DIMS or any(shape[ndim:]):
            raise _BadRequest(f"malformed shape: ndim {ndim}, dims {list(shape)}", resync=True)
        try:
            layout = layout_from_code(dtype, shape[:ndim])
        except ValueError as e:
            raise _BadRequest(short_message(e), resync=True) from None
        return keys, layout

    async def _linger(self, loop, sock: socket.socket) -> None:
        """Before closing a connection the client may still be writing to: send FIN after the error
        answer and discard what arrives until the client closes (for up to a second), so that the
        close does not reset the connection before the client has read the answer."""
        try:
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(1.0):
                while await loop.sock_recv(sock, 65536):
                    pass
        except (OSError, TimeoutError):
            pass

    async def _send(self, loop, sock: socket.socket, data) -> None:
        async with asyncio.timeout(self.write_timeout_s):
            await loop.sock_sendall(sock, data)

    async def _serve_request(self, loop, sock: socket.socket, head: memoryview, buffer: list) -> bool:
        """Answer one request; False when the connection must close."""
        t0 = time.perf_counter()
        try:
            keys, layout = await self._read_request(loop, sock, head)
        except _BadRequest as e:
            await self._send(loop, sock, encode_error("INVALID_ARGUMENT", str(e)))
            return e.resync
        entries, error = await export_entries(self.source, keys, layout)
        if error is not None:
            await self._send(loop, sock, encode_error(*error))
            return True
        n = 0 if entries is None else entries.shape[0]
        await self._send(loop, sock, encode_header(n, layout))
        if n:
            await self._send_layers(loop, sock, entries, layout, buffer)
        if self.on_served is not None:
            self.on_served(entries.numel() * entries.element_size() if n else 0, time.perf_counter() - t0)
        return True

    async def _send_layers(self, loop, sock: socket.socket, entries: torch.Tensor, layout: KVLayout,
                           buffer: list) -> None:
        layers = LayerGather(entries, headroom=LAYER.size, buffer=buffer[0])
        buffer[0] = layers.buffer
        for layer in range(layout.shape[1]):
            data = layers.layer(layer)
            if data is not None:  # stored layer-major: sent in place
                await self._send(loop, sock, LAYER.pack(LAYER_MAGIC, layer, len(data), checksum(data)))
                await self._send(loop, sock, data)
                continue
            framed = layers.gather(layer)  # LAYER.size bytes of room, then the layer's data
            data = framed[LAYER.size:]
            LAYER.pack_into(framed, 0, LAYER_MAGIC, layer, len(data), checksum(data))
            await self._send(loop, sock, framed)
