"""KV transfer over the gRPC Fetch stream, on real servers on loopback: exact round trips, the
leading-run semantics, request validation, and misbehaving peers (in-process servicers and a peer
process killed mid-transfer), each of which must end in TransferError and never in partial KV."""
from __future__ import annotations

import asyncio
import re
import socket
import signal
import subprocess
import sys

import grpc
import pytest
import torch

from kvstore.codec import KVLayout, checksum
from kvstore.transfer import DEFAULT_CHUNK_BYTES, GRPC_OPTIONS, KVTransferService
from kvstore.transfer_client import TransferClient, fetch_kv
from kvstore.transfer_source import TensorSource, TransferError
from kvstore.transfer_wire import decode_response, encode_chunk
from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

from transfer_helpers import (BF16, F32, MISBEHAVIOURS, REPO, SMALL, _header, as_raw, bad_fetch_requests,
                             honest_messages, make_keys, peer, random_entries, ScriptedPeer, serving, source_of)

# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("layout", [BF16, F32], ids=["bf16", "float32"])
async def test_round_trip_is_exact(layout):
    keys, entries = make_keys(5), random_entries(layout, 5)
    async with serving(source_of(keys, entries)) as address:
        client = TransferClient(transport="grpc")
        try:
            out = await client.fetch_kv(address, keys, layout, timeout_s=5)
            assert out.dtype == layout.dtype and tuple(out.shape) == (5, *layout.shape) and out.is_contiguous()
            assert as_raw(out) == as_raw(entries)
            again = await client.fetch_kv(address, keys[:2], layout, timeout_s=5)  # the cached channel
            assert as_raw(again) == as_raw(entries[:2])
            assert len(client._channels) == 1
        finally:
            await client.close()
        # The module-level function, by address and over a given channel.
        assert as_raw(await fetch_kv(address, keys, layout, timeout_s=5)) == as_raw(entries)
        async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
            assert as_raw(await fetch_kv(channel, keys[1:], layout, timeout_s=5)) == as_raw(entries[1:])


@pytest.mark.asyncio
async def test_only_the_leading_run_of_held_keys_is_sent():
    keys, entries = make_keys(5), random_entries(BF16, 5)
    held = {k: e for i, (k, e) in enumerate(zip(keys, entries)) if i != 2}  # lacks key 3 of 5
    async with serving(TensorSource(held)) as address:
        out = await fetch_kv(address, keys, BF16, timeout_s=5)
        assert out.shape[0] == 2 and as_raw(out) == as_raw(entries[:2])
        none = await fetch_kv(address, make_keys(3, "unknown"), BF16, timeout_s=5)
        assert tuple(none.shape) == (0, *BF16.shape)
        assert (await fetch_kv(address, [], BF16, timeout_s=5)).shape[0] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("chunk", [1, 45, 64, 100, 1000])
async def test_pieces_smaller_than_a_layer_reassemble_exactly(chunk):
    keys, entries = make_keys(5), random_entries(SMALL, 5, seed=chunk)  # layers of 5 * 64 = 320 bytes
    async with serving(source_of(keys, entries)) as address:
        out = await fetch_kv(address, keys, SMALL, timeout_s=5, max_chunk_bytes=chunk)
        assert as_raw(out) == as_raw(entries)


@pytest.mark.asyncio
async def test_receives_into_a_given_buffer():
    keys, entries = make_keys(4), random_entries(BF16, 4)
    out = torch.zeros((6, *BF16.shape), dtype=BF16.dtype)
    async with serving(source_of(keys[:3], entries[:3])) as address:
        got = await fetch_kv(address, keys, BF16, timeout_s=5, out=out, max_chunk_bytes=100)
        assert got.shape[0] == 3 and got.data_ptr() == out.data_ptr()
        assert as_raw(out[:3]) == as_raw(entries[:3])
        with pytest.raises(ValueError, match="out must be"):
            await fetch_kv(address, keys, BF16, timeout_s=5, out=out[:3])


@pytest.mark.asyncio
async def test_protobuf_encoded_service_interoperates():
    """The generated registration serves protobuf-built messages: the same bytes on the wire."""
    keys, entries = make_keys(3), random_entries(F32, 3)
    async with peer(KVTransferService(source_of(keys, entries))) as address:
        out = await fetch_kv(address, keys, F32, timeout_s=5, max_chunk_bytes=300)
        assert as_raw(out) == as_raw(entries)


def test_hand_encoded_pieces_are_plain_protobuf():
    data = bytes(range(256)) * 3
    msg = kvtransfer_pb2.FetchResponse.FromString(encode_chunk(7, 1 << 40, memoryview(data)))
    assert (msg.chunk.layer, msg.chunk.offset, msg.chunk.data, msg.chunk.checksum) == (7, 1 << 40, data,
                                                                                       checksum(data))
    standard = msg.SerializeToString()
    kind, layer, offset, (start, end), data_checksum = decode_response(standard)
    assert (kind, layer, offset, standard[start:end], data_checksum) == ("chunk", 7, 1 << 40, data, checksum(data))
    with pytest.raises(ValueError):
        decode_response(standard[:-5])  # truncated
    with pytest.raises(ValueError, match="bad header"):
        decode_response(b"\x0a\x02\x08\xff")  # a header whose varint runs past its end


# ---------------------------------------------------------------------------------------------
# Requests the server refuses
# ---------------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_layout_mismatch_is_a_clear_error():
    keys, entries = make_keys(2), random_entries(BF16, 2)
    async with serving(source_of(keys, entries)) as address:
        other = KVLayout(torch.bfloat16, (2, 3, 2, 8, 8))
        with pytest.raises(TransferError, match=r"FAILED_PRECONDITION.*layout mismatch.*bfloat16\[2, 3, 2, 4, 8\]"):
            await fetch_kv(address, keys, other, timeout_s=5)
        with pytest.raises(TransferError, match=address):
            await fetch_kv(address, keys, KVLayout(torch.float32, BF16.shape), timeout_s=5)


@pytest.mark.asyncio
async def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving():
    keys, entries = make_keys(3), random_entries(BF16, 3)
    async with serving(source_of(keys, entries), max_keys=4) as address:
        async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
            stub = kvtransfer_pb2_grpc.KVTransferStub(channel)
            for request, message in bad_fetch_requests(keys):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [m async for m in stub.Fetch(request, timeout=5)]
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert re.search(message, err.value.details() or ""), err.value.details()
        assert as_raw(await fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries)
    with pytest.raises(ValueError, match="16-byte"):
        await fetch_kv("127.0.0.1:1", [b"short"], BF16, timeout_s=5)


@pytest.mark.asyncio
async def test_a_failing_source_is_internal():
    class Broken:
        async def export(self, keys, layout):
            raise OSError("disk on fire")

    async with serving(Broken()) as address:
        with pytest.raises(TransferError, match="INTERNAL.*disk on fire"):
            await fetch_kv(address, make_keys(2), BF16, timeout_s=5)


@pytest.mark.asyncio
async def test_an_unreachable_peer_is_a_transfer_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(TransferError, match=f"127.0.0.1:{port}.*UNAVAILABLE"):
        await fetch_kv(f"127.0.0.1:{port}", make_keys(1), BF16, timeout_s=5)


# ---------------------------------------------------------------------------------------------
# Misbehaving peers
# ---------------------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(MISBEHAVIOURS))
async def test_a_misbehaving_peer_is_a_transfer_error(case):
    keys, entries = make_keys(4), random_entries(SMALL, 4)
    messages = honest_messages(entries, chunk=100)
    assert len(messages) == 10
    mutate, problem = MISBEHAVIOURS[case]
    async with peer(ScriptedPeer(mutate(messages))) as address:
        with pytest.raises(TransferError, match=problem) as err:
            await fetch_kv(address, keys, SMALL, timeout_s=5, max_chunk_bytes=100)
        assert address in str(err.value)
    async with peer(ScriptedPeer(messages)) as address:  # the same script, honest, is accepted
        assert as_raw(await fetch_kv(address, keys, SMALL, timeout_s=5, max_chunk_bytes=100)) == as_raw(entries)


@pytest.mark.asyncio
@pytest.mark.parametrize("stall_after", [0, 1, 5, 10], ids=["before-header", "after-header", "mid-layer", "at-end"])
async def test_a_stalling_peer_hits_the_deadline(stall_after):
    keys, entries = make_keys(4), random_entries(SMALL, 4)
    async with peer(ScriptedPeer(honest_messages(entries, chunk=100), stall_after=stall_after)) as address:
        with pytest.raises(TransferError, match="deadline"):
            await asyncio.wait_for(fetch_kv(address, keys, SMALL, timeout_s=0.3, max_chunk_bytes=100), 10)


@pytest.mark.asyncio
@pytest.mark.parametrize("garbage", [b"\x12\xff\xff", b"\x12\x05\x08\x00\x1a\x10a", b"\x0b", b"\x12\x00\x0a"])
async def test_a_malformed_message_is_a_transfer_error(garbage):
    """Bytes that are not a FetchResponse (sent by a handler without a serializer)."""
    async def fetch(request, context):
        yield _header(2, SMALL).SerializeToString()
        yield garbage

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kvweave.v1.KVTransfer", {
        "Fetch": grpc.unary_stream_rpc_method_handler(fetch)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with pytest.raises(TransferError, match="malformed message"):
            await fetch_kv(f"127.0.0.1:{port}", make_keys(2), SMALL, timeout_s=5)
    finally:
        await server.stop(None)


class _SeeMessages(grpc.aio.UnaryStreamClientInterceptor):
    """Counts the messages the client has received."""

    def __init__(self) -> None:
        self.count = 0
        self.got_a_piece = asyncio.Event()

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)

        async def messages():
            async for msg in call:
                self.count += 1
                if self.count >= 2:
                    self.got_a_piece.set()
                yield msg

        return messages()


@pytest.mark.asyncio
async def test_a_peer_process_killed_mid_transfer_is_a_transfer_error():
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "kvstore" / "stalling_peer.py")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30))
        seen = _SeeMessages()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS,
                                             interceptors=[seen]) as channel:
            fetch = asyncio.create_task(fetch_kv(channel, make_keys(4), BF16, timeout_s=60, max_chunk_bytes=100))
            await asyncio.wait_for(seen.got_a_piece.wait(), 10)
            assert (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)).strip() == "sent layer 0"
            assert not fetch.done()
            proc.send_signal(signal.SIGKILL)
            with pytest.raises(TransferError, match="UNAVAILABLE|INTERNAL|CANCELLED|UNKNOWN") as err:
                await asyncio.wait_for(fetch, 10)  # long before the 60 s deadline
            assert str(port) in str(err.value)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_default_chunk_fits_grpc_default_message_limit():
    assert len(encode_chunk(1000, 1 << 40, bytes(DEFAULT_CHUNK_BYTES))) <= 4 * 1024 * 1024
