"""KV transfer with a cluster secret: every transport (TCP data plane, gRPC stream, torch.distributed
pair) fetches exact bytes between holders of the secret, and refuses a client without it or with
another cluster's (UNAUTHENTICATED over gRPC, a failed handshake on the data plane)."""
from __future__ import annotations

import pytest

from kvstore.transfer_client import TransferClient
from kvstore.transfer_source import TransferError
from kvweave.cluster_secret import ClusterSecret

from transfer_helpers import F32, as_raw, make_keys, random_entries, serving, source_of

SECRET = ClusterSecret(b"s" * 32)
OTHER = ClusterSecret(b"o" * 32)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["tcp", "grpc", "dist", "ipc"])
async def test_holders_of_the_secret_fetch_exact_kv(transport: str) -> None:
    keys, entries = make_keys(5), random_entries(F32, 5, seed=3)
    async with serving(source_of(keys, entries), secret=SECRET) as address:
        client = TransferClient(transport=transport, secret=SECRET)
        try:
            got = await client.fetch_kv(address, keys, F32, timeout_s=20)
        finally:
            await client.close()
    assert as_raw(got) == as_raw(entries)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["tcp", "grpc", "dist", "ipc"])
@pytest.mark.parametrize("secret", [None, OTHER], ids=["no-secret", "other-cluster"])
async def test_a_client_without_the_secret_gets_no_kv(transport: str, secret: ClusterSecret | None) -> None:
    keys, entries = make_keys(3), random_entries(F32, 3, seed=4)
    async with serving(source_of(keys, entries), secret=SECRET) as address:
        client = TransferClient(transport=transport, secret=secret)
        try:
            with pytest.raises(TransferError) as e:
                await client.fetch_kv(address, keys, F32, timeout_s=3)
        finally:
            await client.close()
    assert "UNAUTHENTICATED" in str(e.value) or transport == "tcp"


@pytest.mark.asyncio
async def test_data_plane_peers_of_different_clusters_refuse_each_other() -> None:
    from kvstore.tcp_client import KVDataClient
    from kvstore.tcp_transfer import KVDataServer

    keys, entries = make_keys(2), random_entries(F32, 2, seed=5)
    server = KVDataServer(source_of(keys, entries), key=OTHER.derive("kv-data-plane"))
    port = await server.start()
    client = KVDataClient(key=SECRET.derive("kv-data-plane"))
    try:
        with pytest.raises(TransferError, match="handshake"):
            await client.fetch_kv(f"127.0.0.1:{port}", keys, F32, timeout_s=5)
        assert server.num_refused == 1
    finally:
        await client.close()
        await server.stop()
