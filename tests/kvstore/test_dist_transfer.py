"""KV transfer over torch.distributed point-to-point (gloo), on real servers on loopback: exact round
trips over one cached pair, the leading-run semantics, the same request validation as the other
transports, concurrent fetches on one pair, and failures (a lying server, a rendezvous that
cannot complete, a stalled and then killed peer process, a restarted server), each of which must
end in TransferError within the deadline, drop the pair, and leave the next fetch working."""
from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys

import grpc
import pytest
import torch

from kvstore import dist_group
from kvstore.codec import KVLayout
from kvstore.dist_transfer import DistServer
from kvstore.transfer import GRPC_OPTIONS, KVTransferService, serve_transfer
from kvstore.transfer_client import TransferClient
from kvstore.transfer_source import TensorSource, TransferError, layer_major, layout_to_proto
from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

from transfer_helpers import (BF16, F32, REPO, _Fixed, as_raw, bad_fetch_requests, client_of, make_keys, peer,
                             random_entries, serving_with, source_of, until)

BIG = KVLayout(torch.bfloat16, (2, 4, 8, 16, 64))  # 256 KiB entries: layers of n * 64 KiB


def dist_serving(source, port: int = 0, **kwargs):
    """serve_transfer with its DistServer: (gRPC address, DistServer)."""
    return serving_with(source, "dist_server", port, **kwargs)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("layout", [BF16, F32], ids=["bf16", "float32"])
async def test_dist_round_trip_is_exact_over_one_cached_pair(layout):
    keys, entries = make_keys(5), random_entries(layout, 5)
    async with dist_serving(source_of(keys, entries)) as (address, server), client_of(transport="dist") as client:
        out = await client.fetch_kv(address, keys, layout, timeout_s=5)
        assert out.dtype == layout.dtype and tuple(out.shape) == (5, *layout.shape)
        assert layer_major(out) is not None  # each layer was received in place
        assert as_raw(out) == as_raw(entries)
        pair_id = client.dist_client.pair_id(address)
        assert pair_id and server.num_pairs == 1
        # Into a given buffer (staged and copied): the result is its leading part.
        buffer = torch.zeros((7, *layout.shape), dtype=layout.dtype)
        got = await client.fetch_kv(address, keys[1:], layout, timeout_s=5, out=buffer)
        assert got.data_ptr() == buffer[:4].data_ptr() and as_raw(got) == as_raw(entries[1:])
        # A layer-major source is sent in place and arrives the same.
        stored = torch.empty_like(entries).movedim(2, 0).contiguous().movedim(0, 2)
        stored.copy_(entries)
        async with dist_serving(_Fixed(stored)) as (lm_address, _):
            assert as_raw(await client.fetch_kv(lm_address, keys, layout, timeout_s=5)) == as_raw(entries)
        assert client.dist_client.pair_id(address) == pair_id and server.num_pairs == 1  # the same pair
    await until(lambda: server.num_pairs == 0)  # the client closed: the server dropped its side


@pytest.mark.asyncio
async def test_dist_sends_only_the_leading_run_of_held_keys():
    keys, entries = make_keys(5), random_entries(BF16, 5)
    held = {k: e for i, (k, e) in enumerate(zip(keys, entries)) if i != 2}  # lacks key 3 of 5
    async with dist_serving(TensorSource(held)) as (address, _), client_of(transport="dist") as client:
        out = await client.fetch_kv(address, keys, BF16, timeout_s=5)
        assert out.shape[0] == 2 and as_raw(out) == as_raw(entries[:2])
        none = await client.fetch_kv(address, make_keys(3, "unknown"), BF16, timeout_s=5)
        assert tuple(none.shape) == (0, *BF16.shape)
        assert (await client.fetch_kv(address, [], BF16, timeout_s=5)).shape[0] == 0
        buffer = torch.zeros((6, *BF16.shape), dtype=BF16.dtype)
        got = await client.fetch_kv(address, keys, BF16, timeout_s=5, out=buffer)
        assert got.shape[0] == 2 and got.data_ptr() == buffer.data_ptr() and as_raw(buffer[:2]) == as_raw(entries[:2])
        with pytest.raises(ValueError, match="out must be"):
            await client.fetch_kv(address, keys, BF16, timeout_s=5, out=buffer[:3])


@pytest.mark.asyncio
async def test_two_concurrent_fetches_on_one_pair_do_not_mix():
    keys, entries = make_keys(24), random_entries(BIG, 24, seed=3)  # layers of 1.5 MiB
    async with dist_serving(source_of(keys, entries)) as (address, server), client_of(transport="dist") as client:
        await client.fetch_kv(address, keys[:1], BIG, timeout_s=5)  # builds the pair
        buffer = torch.empty((16, *BIG.shape), dtype=BIG.dtype)
        for _ in range(3):
            a, b, c = await asyncio.gather(client.fetch_kv(address, keys, BIG, timeout_s=10),
                                           client.fetch_kv(address, keys[8:], BIG, timeout_s=10, out=buffer),
                                           client.fetch_kv(address, keys[20:], BIG, timeout_s=10))
            assert as_raw(a) == as_raw(entries) and as_raw(b) == as_raw(entries[8:])
            assert as_raw(c) == as_raw(entries[20:])
        assert server.num_pairs == 1


# ---------------------------------------------------------------------------------------------
# Requests the server refuses
# ---------------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_dist_bad_requests_get_the_statuses_of_the_other_transports():
    keys, entries = make_keys(3), random_entries(BF16, 3)
    async with dist_serving(source_of(keys, entries), max_keys=4) as (address, _), \
            client_of(transport="dist") as client:
        assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries)
        pair_id = client.dist_client.pair_id(address)
        async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
            stub = kvtransfer_pb2_grpc.KVTransferStub(channel)
            bad = [(kvtransfer_pb2.DistFetchRequest(pair_id=pair_id, tag=999, fetch=fetch), message)
                   for fetch, message in bad_fetch_requests(keys)]
            fetch = kvtransfer_pb2.FetchRequest(keys=keys, layout=layout_to_proto(BF16))
            bad.append((kvtransfer_pb2.DistFetchRequest(pair_id=pair_id, tag=0, fetch=fetch), "tag must be in"))
            for request, message in bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.DistFetch(request, timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert re.search(message, err.value.details() or ""), err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.DistFetch(kvtransfer_pb2.DistFetchRequest(pair_id="nope", tag=1, fetch=fetch), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "unknown pair 'nope'" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in stub.DistConnect(kvtransfer_pb2.DistConnectRequest(backend="mpi"), timeout=5)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown backend 'mpi'" in err.value.details()
            if "nccl" not in dist_group.available_backends():  # a server without CUDA does not offer it
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [m async for m in stub.DistConnect(kvtransfer_pb2.DistConnectRequest(backend="nccl"), timeout=5)]
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "unknown backend 'nccl'; this server offers gloo" in err.value.details()
                with pytest.raises(ValueError, match="nccl backend needs CUDA"):
                    TransferClient(transport="dist", dist_backend="nccl")
        other = KVLayout(torch.bfloat16, (2, 3, 2, 8, 8))
        with pytest.raises(TransferError, match=rf"{address}: FAILED_PRECONDITION: layout mismatch.*"
                                                r"bfloat16\[2, 3, 2, 4, 8\]"):
            await client.fetch_kv(address, keys, other, timeout_s=5)
        with pytest.raises(TransferError, match=r"INVALID_ARGUMENT: too many keys: 5 \(at most 4 per fetch\)"):
            await client.fetch_kv(address, make_keys(5), BF16, timeout_s=5)
        # Refused requests send nothing: the pair is kept and still works.
        assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries)
        assert client.dist_client.pair_id(address) == pair_id

    class Broken:
        async def export(self, keys, layout):
            raise OSError("disk on fire")

    async with dist_serving(Broken()) as (address, _), client_of(transport="dist") as client:
        with pytest.raises(TransferError, match="INTERNAL: internal error: disk on fire"):
            await client.fetch_kv(address, keys, BF16, timeout_s=5)


@pytest.mark.asyncio
async def test_a_peer_without_the_dist_transport_is_a_clear_error():
    keys, entries = make_keys(2), random_entries(BF16, 2)
    server, port = await serve_transfer(source_of(keys, entries), dist=False)
    try:
        async with client_of(transport="dist") as client:
            with pytest.raises(TransferError, match=f"127.0.0.1:{port}: the peer does not serve the "
                                                    "torch.distributed transport"):
                await client.fetch_kv(f"127.0.0.1:{port}", keys, BF16, timeout_s=5)
    finally:
        await server.stop(None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there once closed
    async with client_of(transport="dist") as client:
        with pytest.raises(TransferError, match=f"127.0.0.1:{closed}: rendezvous: UNAVAILABLE"):
            await client.fetch_kv(f"127.0.0.1:{closed}", keys, BF16, timeout_s=5)
    with pytest.raises(ValueError, match="unknown torch.distributed backend 'mpi'"):
        TransferClient(transport="dist", dist_backend="mpi")


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------

class _LyingDistServer(DistServer):
    """Announces a wrong checksum for layer 1."""

    def _post(self, group, backend, entries, tag):
        checksums, works = super()._post(group, backend, entries, tag)
        checksums[1] ^= 1
        return checksums, works


@pytest.mark.asyncio
@pytest.mark.parametrize("given_out", [False, True], ids=["fresh", "given-out"])
async def test_a_checksum_mismatch_is_a_transfer_error_and_drops_the_pair(given_out):
    keys, entries = make_keys(4), random_entries(BF16, 4)
    source = source_of(keys, entries)
    lying = _LyingDistServer(source)
    async with peer(KVTransferService(source, dist_server=lying)) as address, client_of(transport="dist") as client:
        out = torch.empty((4, *BF16.shape), dtype=BF16.dtype) if given_out else None
        with pytest.raises(TransferError, match=f"{address}: layer 1: checksum mismatch"):
            await client.fetch_kv(address, keys, BF16, timeout_s=5, out=out)
        assert client.dist_client.pair_id(address) is None
        await until(lambda: lying.num_pairs == 0)  # its stream ended: the server dropped its side too
        lying.__class__ = DistServer  # honest from now on: the next fetch builds a new pair and succeeds
        assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5, out=out)) == as_raw(entries)
    lying.close()


class _UnreachableStore(kvtransfer_pb2_grpc.KVTransferServicer):
    """Answers DistConnect with a store nobody listens on."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def DistConnect(self, request, context):
        yield kvtransfer_pb2.DistConnectResponse(store_host="127.0.0.1", store_port=self.port, pair_id="p")
        await asyncio.Event().wait()


@pytest.mark.asyncio
async def test_a_rendezvous_that_cannot_complete_is_a_transfer_error_within_the_deadline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    async with peer(_UnreachableStore(closed)) as address, client_of(transport="dist") as client:
        with pytest.raises(TransferError, match=f"{address}: rendezvous through 127.0.0.1:{closed}"):
            await asyncio.wait_for(client.fetch_kv(address, make_keys(2), BF16, timeout_s=0.5), 5)
        assert client.dist_client.pair_id(address) is None


@pytest.mark.asyncio
async def test_a_restarted_server_gets_a_new_pair():
    keys, entries = make_keys(3), random_entries(F32, 3)
    async with client_of(transport="dist") as client:
        async with dist_serving(source_of(keys, entries)) as (address, _):
            assert as_raw(await client.fetch_kv(address, keys, F32, timeout_s=5)) == as_raw(entries)
            first = client.dist_client.pair_id(address)
        await until(lambda: client.dist_client.pair_id(address) is None)  # the stream ended with the server
        port = int(address.rsplit(":", 1)[1])
        async with dist_serving(source_of(keys, entries), port=port) as (again, server):
            assert again == address
            assert as_raw(await client.fetch_kv(address, keys, F32, timeout_s=5)) == as_raw(entries)
            assert client.dist_client.pair_id(address) not in (None, first) and server.num_pairs == 1
            # A pair the server forgot while the client kept it: NOT_FOUND, and a new pair at once.
            stale = client.dist_client._pairs[address]
            server._pairs.pop(stale.pair_id)
            assert as_raw(await client.fetch_kv(address, keys, F32, timeout_s=5)) == as_raw(entries)
            assert client.dist_client.pair_id(address) != stale.pair_id


_CLIENT = """
import asyncio, sys
from kvstore.transfer_client import TransferClient
from kvstore.codec import KVLayout
import torch

async def main():
    client = TransferClient(transport="dist")
    keys, layout = [bytes.fromhex(k) for k in sys.argv[2:]], KVLayout(torch.float32, (2, 4, 1, 4, 16))  # F32
    print((await client.fetch_kv(sys.argv[1], keys, layout, 30)).shape[0], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_the_server_drops_the_pair_of_a_killed_client_process():
    keys, entries = make_keys(3), random_entries(F32, 3)
    async with dist_serving(source_of(keys, entries)) as (address, server):
        proc = subprocess.Popen([sys.executable, "-c", _CLIENT, address, *(k.hex() for k in keys)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)).strip() == "3"
            assert server.num_pairs == 1
            proc.send_signal(signal.SIGKILL)
            await until(lambda: server.num_pairs == 0)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.asyncio
async def test_a_dist_peer_stalled_then_killed_mid_transfer_is_a_transfer_error_and_a_restart_serves():
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "kvstore" / "stalling_peer.py"), "--dist"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60))
        address = f"127.0.0.1:{port}"
        keys, entries = make_keys(4), random_entries(BF16, 4)
        async with client_of(transport="dist") as client:
            # Stalled after layer 0: the deadline.
            with pytest.raises(TransferError, match=f"{address}: no complete answer within the 1 s deadline "
                                                    r"\(receiving layer 1\)"):
                await asyncio.wait_for(client.fetch_kv(address, keys, BF16, timeout_s=1), 10)
            assert client.dist_client.pair_id(address) is None
            assert (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)).strip() == "sent layer 0"
            # Cancelled while stalled: the pair is dropped at once; the given buffer is left alone.
            buffer = torch.zeros((4, *BF16.shape), dtype=BF16.dtype)
            fetch = asyncio.create_task(client.fetch_kv(address, keys, BF16, timeout_s=60, out=buffer))
            assert (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)).strip() == "sent layer 0"
            await until(lambda: client.dist_client.pair_id(address) is not None)
            fetch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await fetch
            assert client.dist_client.pair_id(address) is None
            # Killed after layer 0: long before the 60 s deadline.
            fetch = asyncio.create_task(client.fetch_kv(address, keys, BF16, timeout_s=60))
            assert (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)).strip() == "sent layer 0"
            assert not fetch.done()
            proc.send_signal(signal.SIGKILL)
            with pytest.raises(TransferError, match=f"{address}: receiving layer 1: (Connection closed by peer|"
                                                    f"Read error .*Connection reset by peer)"):
                await asyncio.wait_for(fetch, 10)
            assert client.dist_client.pair_id(address) is None
            assert proc.wait(10) == -signal.SIGKILL
            # A real server restarted on the same address: the next fetch builds a new pair.
            async with dist_serving(source_of(keys, entries), port=port) as (again, _):
                assert again == address
                assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
