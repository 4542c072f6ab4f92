"""KV transfer through memory both processes map (kvstore/ipc_transfer.py), on real servers on
loopback: exact round trips (in one process and from a server in another process), the
leading-run semantics, leases (released by the client, expired when it never comes back, bounded
in bytes), the same request validation as the other transports, a caller on another node, and a
lying server. Host memory only: a CUDA IPC handle cannot be made without a GPU, so the device half
of `kvstore.ipc_share` runs in the device check (benchmarks/device_check.py, `ipc_handoff`)."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import grpc
import pytest
import torch

from kvstore.codec import KVLayout
from kvstore.ipc_share import SHM_DIR, node_id
from kvstore.transfer import GRPC_OPTIONS, serve_transfer
from kvstore.transfer_source import TransferError, layer_major, layout_to_proto
from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

from transfer_helpers import (BF16, F32, REPO, as_raw, bad_fetch_requests, client_of, make_keys, peer,
                             random_entries, serving_with, source_of, until)


def ipc_serving(source, **kwargs):
    """serve_transfer with its IpcServer: (gRPC address, IpcServer)."""
    return serving_with(source, "ipc_server", dist=False, **kwargs)


@pytest.mark.asyncio
@pytest.mark.parametrize("layout", [BF16, F32], ids=["bf16", "float32"])
async def test_ipc_round_trip_is_exact_and_releases_its_lease(layout):
    keys, entries = make_keys(5), random_entries(layout, 5)
    served = []
    async with ipc_serving(source_of(keys, entries), on_served=lambda n, s: served.append(n)) as (address, server), \
            client_of(transport="ipc") as client:
        out = await client.fetch_kv(address, keys, layout, timeout_s=5)
        assert out.dtype == layout.dtype and tuple(out.shape) == (5, *layout.shape)
        assert layer_major(out) is not None
        assert as_raw(out) == as_raw(entries)
        await until(lambda: server.num_leases == 0)  # the client released it
        assert server.leased_bytes == 0 and served == [5 * layout.nbytes]
        buffer = torch.zeros((7, *layout.shape), dtype=layout.dtype)
        got = await client.fetch_kv(address, keys[1:], layout, timeout_s=5, out=buffer)
        assert got.data_ptr() == buffer[:4].data_ptr() and as_raw(got) == as_raw(entries[1:])
        out[:] = 0  # the result is the client's own memory, not the server's
        assert as_raw(await client.fetch_kv(address, keys, layout, timeout_s=5)) == as_raw(entries)


@pytest.mark.asyncio
async def test_ipc_sends_only_the_leading_run_of_held_keys():
    keys, entries = make_keys(5), random_entries(BF16, 5)
    held = {k: e for i, (k, e) in enumerate(zip(keys, entries)) if i != 2}
    async with ipc_serving(source_of(list(held), torch.stack(list(held.values())))) as (address, server), \
            client_of(transport="ipc") as client:
        assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries[:2])
        none = await client.fetch_kv(address, make_keys(2, "other"), BF16, timeout_s=5)
        assert none.shape == (0, *BF16.shape)
        await until(lambda: server.num_leases == 0)


_SERVER_SCRIPT = """
import asyncio, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests/kvstore")
from kvstore.transfer import serve_transfer
from transfer_helpers import BF16, make_keys, random_entries, source_of

async def main():
    server, port = await serve_transfer(source_of(make_keys(6), random_entries(BF16, 6, seed=7)),
                                        data_plane=False, dist=False)
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_ipc_maps_the_memory_of_a_server_in_another_process():
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60))
        async with client_of(transport="ipc") as client:
            out = await client.fetch_kv(f"127.0.0.1:{port}", make_keys(6), BF16, timeout_s=10)
            assert as_raw(out) == as_raw(random_entries(BF16, 6, seed=7))
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.asyncio
async def test_ipc_leases_expire_and_are_bounded():
    keys, entries = make_keys(4), random_entries(BF16, 4)
    fetch = kvtransfer_pb2.FetchRequest(keys=keys, layout=layout_to_proto(BF16))
    async with ipc_serving(source_of(keys, entries)) as (address, server), \
            grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = kvtransfer_pb2_grpc.KVTransferStub(channel)
        # A client that never releases: the lease expires on its own.
        reply = await stub.IpcFetch(kvtransfer_pb2.IpcFetchRequest(fetch=fetch, node_id=node_id(), lease_ms=200))
        assert reply.num_entries == 4 and reply.lease_id and server.num_leases == 1
        assert server.leased_bytes == 4 * BF16.nbytes
        shm_file = SHM_DIR / reply.handle.host.storage_handle.decode()
        assert shm_file.stat().st_size == 4 * BF16.nbytes
        await until(lambda: server.num_leases == 0)
        assert server.leased_bytes == 0 and not shm_file.exists()  # the export's file went with the lease
        assert not (await stub.IpcRelease(kvtransfer_pb2.IpcReleaseRequest(lease_id=reply.lease_id))).found
        # Bounded: past max_leased_bytes the server refuses until a lease is released.
        server.max_leased_bytes = 6 * BF16.nbytes
        first = await stub.IpcFetch(kvtransfer_pb2.IpcFetchRequest(fetch=fetch, node_id=node_id()))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.IpcFetch(kvtransfer_pb2.IpcFetchRequest(fetch=fetch, node_id=node_id()))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "leased to peers" in err.value.details()
        assert (await stub.IpcRelease(kvtransfer_pb2.IpcReleaseRequest(lease_id=first.lease_id))).found
        assert not (SHM_DIR / first.handle.host.storage_handle.decode()).exists()
        assert (await stub.IpcFetch(kvtransfer_pb2.IpcFetchRequest(fetch=fetch, node_id=node_id()))).num_entries == 4


@pytest.mark.asyncio
async def test_ipc_refuses_bad_requests_and_callers_on_other_nodes():
    keys, entries = make_keys(3), random_entries(BF16, 3)
    async with ipc_serving(source_of(keys, entries), max_keys=4) as (address, server), \
            grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel, client_of(transport="ipc") as client:
        stub = kvtransfer_pb2_grpc.KVTransferStub(channel)
        fetch = kvtransfer_pb2.FetchRequest(keys=keys, layout=layout_to_proto(BF16))
        bad = [(kvtransfer_pb2.IpcFetchRequest(fetch=f, node_id=node_id()), m, grpc.StatusCode.INVALID_ARGUMENT)
               for f, m in bad_fetch_requests(keys)]
        bad += [
            (kvtransfer_pb2.IpcFetchRequest(fetch=fetch, node_id=node_id(), device="tpu"), "device must be",
             grpc.StatusCode.INVALID_ARGUMENT),
            (kvtransfer_pb2.IpcFetchRequest(fetch=fetch, node_id="another-node"), "on another node",
             grpc.StatusCode.FAILED_PRECONDITION),
            (kvtransfer_pb2.IpcFetchRequest(fetch=fetch), "on another node", grpc.StatusCode.FAILED_PRECONDITION),
        ]
        for request, message, code in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.IpcFetch(request, timeout=5)
            assert err.value.code() == code and re.search(message, err.value.details() or ""), err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.IpcRelease(kvtransfer_pb2.IpcReleaseRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert server.num_leases == 0  # nothing refused was leased
        other = KVLayout(torch.bfloat16, (2, 3, 2, 8, 8))
        with pytest.raises(TransferError, match=rf"{address}: FAILED_PRECONDITION: layout mismatch"):
            await client.fetch_kv(address, keys, other, timeout_s=5)
        # Still serving after all that.
        assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries)


@pytest.mark.asyncio
async def test_ipc_from_a_peer_without_it_says_so():
    keys, entries = make_keys(2), random_entries(BF16, 2)
    server, bound = await serve_transfer(source_of(keys, entries), data_plane=False, dist=False, ipc=False)
    try:
        async with client_of(transport="ipc") as client:
            with pytest.raises(TransferError, match="does not serve the ipc transport"):
                await client.fetch_kv(f"127.0.0.1:{bound}", keys, BF16, timeout_s=5)
    finally:
        await server.stop(None)


class _LyingIpcPeer(kvtransfer_pb2_grpc.KVTransferServicer):
    def __init__(self, reply: kvtransfer_pb2.IpcFetchResponse) -> None:
        self.reply = reply
        self.released: list[str] = []

    async def IpcFetch(self, request, context):
        return self.reply

    async def IpcRelease(self, request, context):
        self.released.append(request.lease_id)
        return kvtransfer_pb2.IpcReleaseResponse(found=True)


@pytest.mark.asyncio
async def test_ipc_client_rejects_answers_that_fail_a_check():
    keys = make_keys(2)
    layout = layout_to_proto(BF16)
    small = kvtransfer_pb2.IpcHandle(host=kvtransfer_pb2.IpcHandle.Host(storage_handle=b"y"),
                                     storage_bytes=BF16.nbytes)  # room for one entry, two announced
    gone = kvtransfer_pb2.IpcHandle(host=kvtransfer_pb2.IpcHandle.Host(storage_handle=b"kvweave-ipc-" + b"0" * 32),
                                    storage_bytes=2 * BF16.nbytes)
    elsewhere = kvtransfer_pb2.IpcHandle(host=kvtransfer_pb2.IpcHandle.Host(storage_handle=b"../../etc/passwd"),
                                         storage_bytes=2 * BF16.nbytes)
    cases = [
        (kvtransfer_pb2.IpcFetchResponse(num_entries=3, layout=layout), "announced 3 entries for 2 keys"),
        (kvtransfer_pb2.IpcFetchResponse(num_entries=2, layout=layout_to_proto(F32)), "answered layout"),
        (kvtransfer_pb2.IpcFetchResponse(num_entries=2, layout=layout), "without a memory handle"),
        (kvtransfer_pb2.IpcFetchResponse(num_entries=2, layout=layout, handle=small, lease_id="l1"),
         "cannot hold 2 entries"),
        (kvtransfer_pb2.IpcFetchResponse(num_entries=2, layout=layout, handle=gone, lease_id="l2"),
         "cannot map the peer's host memory"),
        (kvtransfer_pb2.IpcFetchResponse(num_entries=2, layout=layout, handle=elsewhere, lease_id="l3"),
         "not a kvweave shared-memory file"),
    ]
    async with client_of(transport="ipc") as client:
        for reply, message in cases:
            servicer = _LyingIpcPeer(reply)
            async with peer(servicer) as address:
                with pytest.raises(TransferError, match=message):
                    await client.fetch_kv(address, keys, BF16, timeout_s=5)
                if reply.lease_id:  # a lease is released even when its answer was refused
                    await until(lambda: servicer.released == [reply.lease_id])


_GPU_SERVER_SCRIPT = _SERVER_SCRIPT.replace("source_of(make_keys(6), random_entries(BF16, 6, seed=7))",
                                            "GpuSource(random_entries(BF16, 6, seed=7).cuda())").replace(
    "data_plane=False, dist=False)", "data_plane=False, dist=False, kv_device='cuda')").replace(
    "async def main():", """class GpuSource:
    def __init__(self, entries):
        self.entries = entries

    async def export(self, keys, layout, on_device=False):
        return self.entries[:len(keys)].clone() if on_device else self.entries[:len(keys)].cpu()

async def main():""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none: the device check's "
                                                          "ipc_handoff covers it on a lent GPU)")
@pytest.mark.asyncio
async def test_ipc_maps_device_memory_of_a_server_in_another_process():
    proc = subprocess.Popen([sys.executable, "-c", _GPU_SERVER_SCRIPT, str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60))
        async with client_of(transport="ipc", ipc_device="cuda") as client:
            for _ in range(3):  # the same memory mapped again is taken from torch's cache
                out = await client.fetch_kv(f"127.0.0.1:{port}", make_keys(6), BF16, timeout_s=30)
                assert out.device.type == "cuda" and as_raw(out.cpu()) == as_raw(random_entries(BF16, 6, seed=7))
    finally:
        proc.kill()
        proc.wait()
