"""A KVTransfer peer that claims every requested key, sends the header and layer 0, then stalls.

Run as a script: prints its (gRPC) port on the first line, then one line ("sent layer 0") each
time it has sent a first layer, and keeps the stream open forever: tests kill -9 it mid-transfer
and check that the fetching side gives up with an error instead of hanging or using partial KV.
With `--tcp` it also serves a TCP data plane (kvstore/tcp_transfer.py) that DataPort announces,
and stalls there the same way (without it, DataPort is UNIMPLEMENTED: a peer without one).
With `--dist` it serves the torch.distributed transport (kvstore/dist_transfer.py): real pairs,
and a DistFetch answered with every layer's checksum, after which only layer 0 is sent.
Without `--dist` only grpc, the generated stubs and xxhash are imported (no torch), so it starts
in a fraction of a second. Layer 0 is zeros with valid checksums: it passes every check the
client makes.
"""
from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402
import xxhash  # noqa: E402

from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc  # noqa: E402

ITEMSIZE_BY_DTYPE_CODE = {1: 2, 2: 2, 3: 4, 4: 1, 5: 1}  # kvstore.codec.DTYPE_CODES
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # kvstore.transfer.MAX_MESSAGE_BYTES
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024 - 4096  # kvstore.transfer.DEFAULT_CHUNK_BYTES
# kvstore.tcp_transfer framing: request, header and layer frame
TCP_REQUEST = struct.Struct("<4sHBB6II")
TCP_HEADER = struct.Struct("<4sHBBB3x6II")
TCP_LAYER = struct.Struct("<4sIQQ")


def layer_bytes(n: int, dtype_code: int, shape: list[int]) -> int | None:
    itemsize = ITEMSIZE_BY_DTYPE_CODE.get(dtype_code)
    if itemsize is None or len(shape) < 2:
        return None
    size = n * shape[0] * itemsize
    for d in shape[2:]:
        size *= d
    return size


class StallingPeer(kvtransfer_pb2_grpc.KVTransferServicer):
    def __init__(self, data_port: int | None = None) -> None:
        self.data_port = data_port

    async def DataPort(self, request, context):
        if self.data_port is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no data plane")
        return kvtransfer_pb2.DataPortResponse(port=self.data_port)

    async def Fetch(self, request, context):
        n = len(request.keys)
        size = layer_bytes(n, request.layout.dtype, list(request.layout.shape))
        if not n or size is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stalling peer: bad request")
        yield kvtransfer_pb2.FetchResponse(header=kvtransfer_pb2.FetchHeader(num_entries=n, layout=request.layout))
        chunk = request.max_chunk_bytes or DEFAULT_CHUNK_BYTES
        for offset in range(0, size, chunk):
            data = bytes(min(chunk, size - offset))
            yield kvtransfer_pb2.FetchResponse(chunk=kvtransfer_pb2.LayerChunk(
                layer=0, offset=offset, data=data, checksum=xxhash.xxh3_64_intdigest(data)))
        print("sent layer 0", flush=True)
        await asyncio.Event().wait()  # stall with the stream open


async def stall_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the first request on a data connection with a header and layer 0, then stall."""
    magic, _, dtype, ndim, *rest = TCP_REQUEST.unpack(await reader.readexactly(TCP_REQUEST.size))
    n, shape = rest[-1], list(rest[:ndim])
    await reader.readexactly(16 * n)
    size = layer_bytes(n, dtype, shape)
    if magic != b"KVWQ" or not n or size is None:
        writer.close()
        return
    data = bytes(size)
    writer.write(TCP_HEADER.pack(b"KVWR", 1, 0, dtype, ndim, *rest[:6], n))
    writer.write(TCP_LAYER.pack(b"KVWL", 0, size, xxhash.xxh3_64_intdigest(data)) + data)
    await writer.drain()
    print("sent layer 0", flush=True)
    await asyncio.Event().wait()  # stall with the connection open


class StallingDistPeer(StallingPeer):
    """Real DistConnect pairs (rank 0, built with kvstore.dist_group); DistFetch sends layer 0 only."""

    def __init__(self) -> None:
        super().__init__()
        from kvstore import dist_group

        self.dist_group = dist_group
        self.store = dist_group.open_store("127.0.0.1", 60)
        self.groups: dict[str, asyncio.Future] = {}  # pair id -> its group, once built
        self.sends: list = []  # kept: dropping a send's Work drops the send

    async def DistConnect(self, request, context):
        pair_id = f"stall{len(self.groups)}"
        self.groups[pair_id] = asyncio.ensure_future(asyncio.to_thread(
            self.dist_group.new_pair_group, self.store, pair_id, 0, "gloo", "127.0.0.1", 30))
        yield kvtransfer_pb2.DistConnectResponse(store_host="127.0.0.1", store_port=self.store.port, pair_id=pair_id)
        await asyncio.Event().wait()  # the pair lives until the client ends the stream

    async def DistFetch(self, request, context):
        n, layout = len(request.fetch.keys), request.fetch.layout
        size = layer_bytes(n, layout.dtype, list(layout.shape))
        if not n or size is None or request.pair_id not in self.groups:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stalling peer: bad request")
        import torch

        layer0 = torch.zeros(size, dtype=torch.uint8)
        work = self.dist_group.send(await self.groups[request.pair_id], layer0, 1, request.tag)
        self.sends.append(work)

        async def sent() -> None:
            await asyncio.to_thread(self.dist_group.wait, work, 30)
            print("sent layer 0", flush=True)

        self.sends.append(asyncio.create_task(sent()))
        zeros = xxhash.xxh3_64_intdigest(bytes(size))
        return kvtransfer_pb2.DistFetchResponse(num_entries=n, layout=layout,
                                                layer_checksums=[zeros] * layout.shape[1])


async def main() -> None:
    data_port = None
    if "--tcp" in sys.argv[1:]:
        data_server = await asyncio.start_server(stall_tcp, "127.0.0.1", 0)
        data_port = data_server.sockets[0].getsockname()[1]
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    servicer = StallingDistPeer() if "--dist" in sys.argv[1:] else StallingPeer(data_port)
    kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
