"""A KVTransfer peer that claims every requested key, sends the header and layer 0, then stalls.

Run as a script: prints its port on the first line, then one line ("sent layer 0") each time it
has sent a first layer, and keeps the stream open forever: tests kill -9 it mid-transfer and
check that the fetching side gives up with an error instead of hanging or using partial KV.
Only grpc, the generated stubs and xxhash are imported (no torch), so it starts in a fraction of
a second. Layer 0 is zeros with valid checksums: it passes every check the client makes.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402
import xxhash  # noqa: E402

from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc  # noqa: E402

ITEMSIZE_BY_DTYPE_CODE = {1: 2, 2: 2, 3: 4, 4: 1, 5: 1}  # kvstore.codec.DTYPE_CODES
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # kvstore.transfer.MAX_MESSAGE_BYTES
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024 - 4096  # kvstore.transfer.DEFAULT_CHUNK_BYTES


class StallingPeer(kvtransfer_pb2_grpc.KVTransferServicer):
    async def Fetch(self, request, context):
        shape, itemsize = list(request.layout.shape), ITEMSIZE_BY_DTYPE_CODE.get(request.layout.dtype)
        if not request.keys or itemsize is None or len(shape) < 2:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stalling peer: bad request")
        n = len(request.keys)
        yield kvtransfer_pb2.FetchResponse(header=kvtransfer_pb2.FetchHeader(num_entries=n, layout=request.layout))
        layer_bytes = n * shape[0] * itemsize
        for d in shape[2:]:
            layer_bytes *= d
        chunk = request.max_chunk_bytes or DEFAULT_CHUNK_BYTES
        for offset in range(0, layer_bytes, chunk):
            data = bytes(min(chunk, layer_bytes - offset))
            yield kvtransfer_pb2.FetchResponse(chunk=kvtransfer_pb2.LayerChunk(
                layer=0, offset=offset, data=data, checksum=xxhash.xxh3_64_intdigest(data)))
        print("sent layer 0", flush=True)
        await asyncio.Event().wait()  # stall with the stream open


async def main() -> None:
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(StallingPeer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
