"""The wire format of the raw TCP KV data plane, which its server (kvstore/tcp_transfer.py) and its
client (kvstore/tcp_client.py) both speak: frame layouts, status codes, encoders and socket reads.

Wire format (little-endian, fixed-size frames; one connection carries any number of requests,
one after another: a client pools connections).

  request   magic "KVWQ", u16 version (1), u8 dtype code, u8 ndim, u32 shape[6] (unused dims 0),
            u32 n keys (36 bytes), then n 16-byte keys (block hashes, in prompt order)
  header    magic "KVWR", u16 version, u8 status, u8 dtype code, u8 ndim, 3 zero bytes,
            u32 shape[6], u32 value (40 bytes). Status 0 (OK): value is n, the length of the
            leading run of requested keys the server holds, and the layout is the requested one.
            Otherwise (1 INVALID_ARGUMENT: a malformed request; 2 FAILED_PRECONDITION: entries of
            another layout; 3 INTERNAL) value is the length of the UTF-8 message that follows.
  layer     (n > 0, one per layer, in order) magic "KVWL", u32 layer, u64 byte length, u64
            XXH3-64 of the data (24 bytes), then the data: entries[:, :, layer] stacked as
            [n, shape[0], *shape[2:]], contiguous (the layer-major layout of the gRPC path).

Handshake (only a server given a key, the "kv-data-plane" sub-key of the cluster secret; the
key never crosses the wire): on accept the server sends
  challenge magic "KVWA", u16 version, 32-byte server nonce Ns (38 bytes)
the client answers
  answer    magic "KVWA", 32-byte client nonce Nc, HMAC-SHA256(key, "client" Ns Nc) (68 bytes)
and the server, if the MAC is right, proves it holds the key too
  proof     magic "KVWA", HMAC-SHA256(key, "server" Nc Ns) (36 bytes)
before any request. A wrong or late answer (HANDSHAKE_TIMEOUT_S) closes the connection without a
word; a client holding the key refuses a server whose proof is wrong.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket
import struct

from kvstore.codec import DTYPE_CODES, MAX_DIMS, KVLayout

REQUEST_MAGIC = b"KVWQ"
RESPONSE_MAGIC = b"KVWR"
LAYER_MAGIC = b"KVWL"
PROTOCOL_VERSION = 1
REQUEST = struct.Struct(f"<4sHBB{MAX_DIMS}II")
"""magic, version, dtype code, ndim, shape[MAX_DIMS], number of keys; the keys follow."""
HEADER = struct.Struct(f"<4sHBBB3x{MAX_DIMS}II")
"""magic, version, status, dtype code, ndim, shape[MAX_DIMS], n entries (OK) or message length."""
LAYER = struct.Struct("<4sIQQ")
"""magic, layer, byte length, XXH3-64; the data follows."""
STATUS_OK = 0
STATUS_CODES = {"INVALID_ARGUMENT": 1, "FAILED_PRECONDITION": 2, "INTERNAL": 3}
"""Error statuses, named as the gRPC codes the gRPC transport answers with in the same cases."""
STATUS_NAMES = {v: k for k, v in STATUS_CODES.items()}
MAX_ERROR_MESSAGE_BYTES = 4096
KEEP_BUFFER_BYTES = 8 * 1024 * 1024
"""Layer buffers up to this size stay with a connection between requests (larger ones are freed)."""
_NO_SHAPE = (0,) * MAX_DIMS
AUTH_MAGIC = b"KVWA"
NONCE_BYTES = 32
CHALLENGE = struct.Struct("<4sH32s")
ANSWER = struct.Struct("<4s32s32s")
PROOF = struct.Struct("<4s32s")
HANDSHAKE_TIMEOUT_S = 5.0


class ConnectionClosed(Exception):
    """The peer closed the connection; `got` bytes of the awaited span had arrived."""

    def __init__(self, got: int) -> None:
        super().__init__(got)
        self.got = got


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; ConnectionClosed when the peer closes first."""
    got, size = 0, len(view)
    while got < size:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionClosed(got)
        got += n


def pack_shape(layout: KVLayout) -> tuple[int, ...]:
    """The layout's shape padded with zeros to MAX_DIMS, as the frames carry it."""
    return tuple(layout.shape) + (0,) * (MAX_DIMS - len(layout.shape))


def encode_request(keys: list[bytes], layout: KVLayout) -> bytes:
    return b"".join((REQUEST.pack(REQUEST_MAGIC, PROTOCOL_VERSION, DTYPE_CODES[layout.dtype], len(layout.shape),
                                  *pack_shape(layout), len(keys)), *keys))


def encode_header(n: int, layout: KVLayout) -> bytes:
    return HEADER.pack(RESPONSE_MAGIC, PROTOCOL_VERSION, STATUS_OK, DTYPE_CODES[layout.dtype], len(layout.shape),
                       *pack_shape(layout), n)


def encode_error(status: str, message: str) -> bytes:
    data = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_BYTES]
    return HEADER.pack(RESPONSE_MAGIC, PROTOCOL_VERSION, STATUS_CODES[status], 0, 0, *_NO_SHAPE, len(data)) + data


def split_host_port(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class HandshakeError(Exception):
    """The other end failed the data plane's handshake (or does not speak it)."""


def _mac(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, role + first + second, hashlib.sha256).digest()


async def _recv_frame(loop, sock: socket.socket, frame: struct.Struct) -> tuple:
    data = bytearray(frame.size)
    async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
        await recv_exactly(loop, sock, memoryview(data))
    return frame.unpack(data)


async def server_handshake(loop, sock: socket.socket, key: bytes) -> None:
    """Challenge the client; HandshakeError (or ConnectionClosed, TimeoutError) when it fails."""
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    await loop.sock_sendall(sock, CHALLENGE.pack(AUTH_MAGIC, PROTOCOL_VERSION, server_nonce))
    magic, client_nonce, mac = await _recv_frame(loop, sock, ANSWER)
    if magic != AUTH_MAGIC or not hmac.compare_digest(mac, _mac(key, b"client", server_nonce, client_nonce)):
        raise HandshakeError("the client failed the handshake")
    await loop.sock_sendall(sock, PROOF.pack(AUTH_MAGIC, _mac(key, b"server", client_nonce, server_nonce)))


async def client_handshake(loop, sock: socket.socket, key: bytes) -> None:
    """Answer the server's challenge and check its proof; HandshakeError (or ConnectionClosed,
    TimeoutError) when it fails."""
    magic, version, server_nonce = await _recv_frame(loop, sock, CHALLENGE)
    if magic != AUTH_MAGIC or version != PROTOCOL_VERSION:
        raise HandshakeError("the server did not send the handshake's challenge")
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    await loop.sock_sendall(sock, ANSWER.pack(AUTH_MAGIC, client_nonce, _mac(key, b"client", server_nonce, client_nonce)))
    magic, mac = await _recv_frame(loop, sock, PROOF)
    if magic != AUTH_MAGIC or not hmac.compare_digest(mac, _mac(key, b"server", client_nonce, server_nonce)):
        raise HandshakeError("the server failed the handshake (it does not hold the cluster secret)")
