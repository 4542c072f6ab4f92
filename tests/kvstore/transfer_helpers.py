"""Shared pieces of the KV transfer tests: layouts, entries, and real servers and clients on loopback."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import grpc
import torch

from kvstore.codec import KVLayout, checksum
from kvstore.transfer import GRPC_OPTIONS, serve_transfer
from kvstore.transfer_client import TransferClient
from kvstore.transfer_source import TensorSource, layout_to_proto
from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
BF16 = KVLayout(torch.bfloat16, (2, 3, 2, 4, 8))  # [2, n_layers, n_kv_heads, block_size, head_dim]
F32 = KVLayout(torch.float32, (2, 4, 1, 4, 16))
SMALL = KVLayout(torch.float32, (2, 3, 1, 2, 4))  # 32-byte rows, 64 bytes per entry and layer


def make_keys(n: int, tag: str = "k") -> list[bytes]:
    return [hashlib.blake2b(f"{tag}{i}".encode(), digest_size=16).digest() for i in range(n)]


def random_entries(layout: KVLayout, n: int, seed: int = 0) -> torch.Tensor:
    """Random bytes (NaN and denormal patterns included): the transfer must keep every bit."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, layout.nbytes), dtype=torch.uint8, generator=g)
    return raw.view(layout.dtype).view(n, *layout.shape)


def as_raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


class _Fixed:
    """A source that exports one given tensor, whatever the keys."""

    def __init__(self, entries: torch.Tensor) -> None:
        self.entries = entries

    async def export(self, keys, layout):
        return self.entries[:len(keys)]


def source_of(keys: list[bytes], entries: torch.Tensor) -> TensorSource:
    return TensorSource(dict(zip(keys, entries)))


@contextlib.asynccontextmanager
async def serving(source, **service_kwargs):
    """serve_transfer: the gRPC address (its DataPort announces the TCP data plane, unless data_plane=False)."""
    server, port = await serve_transfer(source, **service_kwargs)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def serving_with(source, part: str, port: int = 0, **kwargs):
    """serve_transfer without the TCP data plane: (gRPC address, the TransferServer's `part`, e.g.
    its dist_server or ipc_server)."""
    server, bound = await serve_transfer(source, port=port, data_plane=False, **kwargs)
    try:
        yield f"127.0.0.1:{bound}", getattr(server, part)
    finally:
        await server.stop(None)


async def until(condition, timeout_s: float = 5.0) -> None:
    """Wait until `condition()` holds (TimeoutError after `timeout_s`)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def client_of(**kwargs):
    client = TransferClient(**kwargs)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def peer(servicer: kvtransfer_pb2_grpc.KVTransferServicer):
    """A real server around a custom servicer (protobuf-encoded through the generated stubs)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def honest_messages(entries: torch.Tensor, chunk: int) -> list[kvtransfer_pb2.FetchResponse]:
    """What a correct server sends for `entries` (the layer-by-layer format, built independently)."""
    layout = KVLayout(entries.dtype, tuple(entries.shape[1:]))
    msgs = [kvtransfer_pb2.FetchResponse(header=kvtransfer_pb2.FetchHeader(
        num_entries=entries.shape[0], layout=layout_to_proto(layout)))]
    for layer in range(layout.shape[1]):
        data = as_raw(entries[:, :, layer])
        for offset in range(0, len(data), chunk):
            piece = data[offset:offset + chunk]
            msgs.append(kvtransfer_pb2.FetchResponse(chunk=kvtransfer_pb2.LayerChunk(
                layer=layer, offset=offset, data=piece, checksum=checksum(piece))))
    return msgs


def bad_fetch_requests(keys: list[bytes]) -> list[tuple[kvtransfer_pb2.FetchRequest, str]]:
    """Malformed requests for a server with max_keys=4, and (a regex of) what it must answer with
    INVALID_ARGUMENT, whichever transport carries them."""
    layout = layout_to_proto(BF16)
    return [
        (kvtransfer_pb2.FetchRequest(keys=[keys[0], b"short"], layout=layout), "key 1 has 5 bytes"),
        (kvtransfer_pb2.FetchRequest(keys=make_keys(5), layout=layout), "too many keys: 5 \\(at most 4"),
        (kvtransfer_pb2.FetchRequest(keys=keys, layout=kvtransfer_pb2.KVLayoutProto(dtype=99, shape=[2, 3])),
         "unknown dtype code 99"),
        (kvtransfer_pb2.FetchRequest(keys=keys, layout=kvtransfer_pb2.KVLayoutProto(dtype=1, shape=[8])), "2-6 dims"),
        (kvtransfer_pb2.FetchRequest(keys=keys), "no layout"),
    ]


class ScriptedPeer(kvtransfer_pb2_grpc.KVTransferServicer):
    def __init__(self, messages, stall_after: int | None = None) -> None:
        self.messages, self.stall_after = messages, stall_after

    async def Fetch(self, request, context):
        for i, msg in enumerate(self.messages):
            if i == self.stall_after:
                await asyncio.sleep(3600)
            yield msg
        if self.stall_after == len(self.messages):
            await asyncio.sleep(3600)


def _chunk(msg: kvtransfer_pb2.FetchResponse, **changes) -> kvtransfer_pb2.FetchResponse:
    c = msg.chunk
    fields = {"layer": c.layer, "offset": c.offset, "data": c.data, "checksum": c.checksum} | changes
    return kvtransfer_pb2.FetchResponse(chunk=kvtransfer_pb2.LayerChunk(**fields))


def _header(n: int, layout: KVLayout) -> kvtransfer_pb2.FetchResponse:
    header = kvtransfer_pb2.FetchHeader(num_entries=n, layout=layout_to_proto(layout))
    return kvtransfer_pb2.FetchResponse(header=header)


# SMALL layers: 4 entries * 64 bytes = 256 bytes, in pieces of 100, 100, 56: messages 1-3 are layer
# 0, 4-6 layer 1, 7-9 layer 2.
MISBEHAVIOURS = {
    "payload larger than the layer": (lambda m: m[:3] + [_chunk(m[3], data=m[3].chunk.data + b"xx" * 50,
                                                                checksum=checksum(m[3].chunk.data + b"xx" * 50))]
                                      + m[4:], "does not fit"),
    "payload shorter than the layer": (lambda m: m[:3] + [_chunk(m[3], data=m[3].chunk.data[:10],
                                                                 checksum=checksum(m[3].chunk.data[:10]))] + m[4:],
                                       "sent layer 1 while layer 0 was incomplete"),
    "wrong checksum": (lambda m: m[:5] + [_chunk(m[5], checksum=m[5].chunk.checksum ^ 1)] + m[6:],
                       "layer 1: checksum mismatch"),
    "flipped data byte": (lambda m: m[:5] + [_chunk(m[5], data=b"\0" + m[5].chunk.data[1:])] + m[6:],
                          "checksum mismatch"),
    "missing middle layer": (lambda m: m[:4] + m[7:], "sent layer 2 while layer 1 was incomplete"),
    "missing last layer": (lambda m: m[:7], "ended at layer 2 of 3"),
    "layers out of order": (lambda m: m[:1] + m[4:7] + m[1:4] + m[7:], "sent layer 1 while layer 0"),
    "pieces out of order": (lambda m: m[:1] + [m[2], m[1]] + m[3:], "offset 100, expected 0"),
    "duplicated piece": (lambda m: m[:2] + [m[1]] + m[2:], "offset 0, expected 100"),
    "data after the last layer": (lambda m: m + [m[9]], "after the last layer was complete"),
    "count larger than requested": (lambda m: [_header(5, SMALL)] + m[1:], "announced 5 entries for 4"),
    "other layout announced": (lambda m: [_header(4, KVLayout(torch.bfloat16, SMALL.shape))] + m[1:],
                               "announced layout bfloat16"),
    "no header": (lambda m: m[1:], "the first message is a data piece, not the header"),
    "two headers": (lambda m: m[:1] + m, "sent a header after the header"),
    "empty stream": (lambda m: [], "without a header"),
    "empty message": (lambda m: [kvtransfer_pb2.FetchResponse()] + m[1:], "is an empty message, not the header"),
}
