"""KV transfer over the raw TCP data plane, on real servers on loopback: exact round trips and
connection reuse, request validation, scripted misbehaving TCP peers, stalls, restarts, the
fallback to gRPC for a peer without a data plane, and a peer process killed mid-transfer."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import signal
import struct
import subprocess
import sys

import grpc
import pytest
import torch

from kvstore.codec import DTYPE_CODES, KVLayout, checksum
from kvstore.tcp_client import DataPlaneUnreachableError, KVDataClient
from kvstore.tcp_transfer import KVDataServer
from kvstore.transfer import serve_transfer
from kvstore.transfer_client import TransferClient
from kvstore.transfer_source import TensorSource, TransferError, empty_layer_major, layer_major
from kvweave.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

from transfer_helpers import (BF16, F32, MISBEHAVIOURS, REPO, SMALL, _Fixed, as_raw, client_of,
                             honest_messages, make_keys, peer, random_entries, ScriptedPeer, serving,
                             source_of)

# ---------------------------------------------------------------------------------------------
# The TCP data plane (kvstore.tcp_transfer) and the choice of transport
# ---------------------------------------------------------------------------------------------

# The framing, written out independently of kvstore.tcp_transfer: request, header, layer frame.
TCP_REQUEST = struct.Struct("<4sHBB6II")
TCP_HEADER = struct.Struct("<4sHBBB3x6II")
TCP_LAYER = struct.Struct("<4sIQQ")


def tcp_request(keys: list[bytes], layout: KVLayout, magic: bytes = b"KVWQ", version: int = 1,
                dtype: int | None = None, shape: list[int] | None = None, n: int | None = None) -> bytes:
    shape = list(layout.shape) if shape is None else shape
    return TCP_REQUEST.pack(magic, version, DTYPE_CODES[layout.dtype] if dtype is None else dtype, len(shape),
                            *(shape + [0] * (6 - len(shape))), len(keys) if n is None else n) + b"".join(keys)


def tcp_header(n: int, layout: KVLayout, magic: bytes = b"KVWR", version: int = 1) -> bytes:
    shape = list(layout.shape)
    return TCP_HEADER.pack(magic, version, 0, DTYPE_CODES[layout.dtype], len(shape), *(shape + [0] * (6 - len(shape))),
                           n)


def tcp_error(status: int, message: bytes, length: int | None = None) -> bytes:
    return TCP_HEADER.pack(b"KVWR", 1, status, 0, 0, *[0] * 6, len(message) if length is None else length) + message


def tcp_layer(layer: int, data: bytes, length: int | None = None, data_checksum: int | None = None,
              magic: bytes = b"KVWL") -> bytes:
    return TCP_LAYER.pack(magic, layer, len(data) if length is None else length,
                          checksum(data) if data_checksum is None else data_checksum) + data


def tcp_answer(entries: torch.Tensor) -> list[bytes]:
    """What a correct data server sends for `entries`: the header, then one frame per layer."""
    layout = KVLayout(entries.dtype, tuple(entries.shape[1:]))
    return [tcp_header(entries.shape[0], layout)] + [tcp_layer(layer, as_raw(entries[:, :, layer]))
                                                      for layer in range(layout.shape[1])]


class ScriptedTCPPeer:
    """An asyncio server that answers each request with the byte strings of `script`, stalling
    before piece `stall_before` (if given) and closing after the script when `close` is set."""

    def __init__(self, script: list[bytes], stall_before: int | None = None, close: bool = False) -> None:
        self.script, self.stall_before, self.close = script, stall_before, close
        self.connections = 0
        self.requests: list[bytes] = []
        self._tasks: set[asyncio.Task] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._tasks.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readexactly(TCP_REQUEST.size)
                self.requests.append(head + await reader.readexactly(16 * TCP_REQUEST.unpack(head)[-1]))
                for i, piece in enumerate(self.script):
                    if i == self.stall_before:
                        await writer.drain()
                        await asyncio.sleep(3600)
                    writer.write(piece)
                await writer.drain()
                if self.stall_before == len(self.script):
                    await asyncio.sleep(3600)
                if self.close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self):
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def data_serving(source, **kwargs):
    """A bare KVDataServer: its data address."""
    server = KVDataServer(source, **kwargs)
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("layout", [BF16, F32], ids=["bf16", "float32"])
async def test_tcp_round_trip_is_exact_and_reuses_its_connection(layout):
    keys, entries = make_keys(5), random_entries(layout, 5)
    async with serving(source_of(keys, entries)) as address, client_of(transport="tcp") as client:
        out = await client.fetch_kv(address, keys, layout, timeout_s=5)
        assert out.dtype == layout.dtype and tuple(out.shape) == (5, *layout.shape)
        assert layer_major(out) is not None  # each layer was received in place
        assert as_raw(out) == as_raw(entries)
        # A layer-major source is sent in place (no gather) and arrives the same.
        stored = empty_layer_major(5, layout)
        stored.copy_(entries)
        async with serving(_Fixed(stored)) as lm_address:
            assert as_raw(await client.fetch_kv(lm_address, keys, layout, timeout_s=5)) == as_raw(entries)
        data_address = await client.data_address(address, 5)
        assert data_address != address and client.data_client.idle_connections(data_address) == 1
        idle = client.data_client._idle[data_address][0]
        again = await client.fetch_kv(address, keys[:2], layout, timeout_s=5)
        assert as_raw(again) == as_raw(entries[:2])
        assert client.data_client._idle[data_address] == [idle]  # the same connection, back in the pool
    # The data client alone, given the data address.
    async with data_serving(source_of(keys, entries)) as data_address:
        data = KVDataClient()
        try:
            assert as_raw(await data.fetch_kv(data_address, keys[1:], layout, timeout_s=5)) == as_raw(entries[1:])
        finally:
            await data.close()


@pytest.mark.asyncio
async def test_tcp_layers_larger_than_the_socket_buffers_arrive_exactly():
    layout = KVLayout(torch.bfloat16, (2, 4, 8, 16, 64))  # 256 KiB entries; 48 of them: 3 MiB layers
    keys, entries = make_keys(48), random_entries(layout, 48, seed=3)
    async with serving(source_of(keys, entries)) as address, client_of() as client:
        data_address = await client.data_address(address, 5)
        results = await asyncio.gather(*(client.fetch_kv(address, keys[i:], layout, timeout_s=10) for i in (0, 5, 40)))
        for i, out in zip((0, 5, 40), results):
            assert as_raw(out) == as_raw(entries[i:])
        assert client.data_client.idle_connections(data_address) == 3  # concurrent fetches: one connection each


@pytest.mark.asyncio
async def test_tcp_sends_only_the_leading_run_of_held_keys():
    keys, entries = make_keys(5), random_entries(BF16, 5)
    held = {k: e for i, (k, e) in enumerate(zip(keys, entries)) if i != 2}  # lacks key 3 of 5
    async with serving(TensorSource(held)) as address, client_of(transport="tcp") as client:
        out = await client.fetch_kv(address, keys, BF16, timeout_s=5)
        assert out.shape[0] == 2 and as_raw(out) == as_raw(entries[:2])
        none = await client.fetch_kv(address, make_keys(3, "unknown"), BF16, timeout_s=5)
        assert tuple(none.shape) == (0, *BF16.shape)
        assert (await client.fetch_kv(address, [], BF16, timeout_s=5)).shape[0] == 0
        # Into a given buffer: the result is its leading part.
        buffer = torch.zeros((6, *BF16.shape), dtype=BF16.dtype)
        got = await client.fetch_kv(address, keys, BF16, timeout_s=5, out=buffer)
        assert got.shape[0] == 2 and got.data_ptr() == buffer.data_ptr() and as_raw(buffer[:2]) == as_raw(entries[:2])
        with pytest.raises(ValueError, match="out must be"):
            await client.fetch_kv(address, keys, BF16, timeout_s=5, out=buffer[:3])


@pytest.mark.asyncio
async def test_tcp_errors_name_the_status_and_drop_the_connection():
    keys, entries = make_keys(3), random_entries(BF16, 3)

    class Broken:
        async def export(self, keys, layout):
            raise OSError("disk on fire")

    async with serving(source_of(keys, entries), max_keys=4) as address, client_of(transport="tcp") as client:
        data_address = await client.data_address(address, 5)
        other = KVLayout(torch.bfloat16, (2, 3, 2, 8, 8))
        with pytest.raises(TransferError, match=rf"{address}.*FAILED_PRECONDITION.*layout mismatch.*"
                                                r"bfloat16\[2, 3, 2, 4, 8\]"):
            await client.fetch_kv(address, keys, other, timeout_s=5)
        assert client.data_client.idle_connections(data_address) == 0
        with pytest.raises(TransferError, match=r"INVALID_ARGUMENT: too many keys: 5 \(at most 4 per fetch\)"):
            await client.fetch_kv(address, make_keys(5), BF16, timeout_s=5)
        assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries)
    async with serving(Broken()) as address, client_of(transport="tcp") as client:
        with pytest.raises(TransferError, match="INTERNAL: internal error: disk on fire"):
            await client.fetch_kv(address, keys, BF16, timeout_s=5)


async def _tcp_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status, value = (lambda h: (h[2], h[-1]))(TCP_HEADER.unpack(await reader.readexactly(TCP_HEADER.size)))
    return status, await reader.readexactly(value) if status else value


@pytest.mark.asyncio
async def test_tcp_bad_requests_are_invalid_argument_and_the_server_keeps_serving():
    keys, entries = make_keys(3), random_entries(BF16, 3)
    async with data_serving(source_of(keys, entries), max_keys=4) as data_address:
        host, port = data_address.split(":")
        # Requests it can skip: an error answer, then the next request on the same connection.
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for request, message in [
                (tcp_request(keys, BF16, dtype=99), b"unknown dtype code 99"),
                (tcp_request(keys, BF16, shape=[8]), b"2-6 dims"),
                (tcp_request(keys, BF16, shape=[2, 0, 3]), b"positive dims"),
            ]:
                writer.write(request)
                status, text = await asyncio.wait_for(_tcp_answer(reader), 5)
                assert status == 1 and message in text, text
            writer.write(tcp_request(keys[:1], BF16))
            assert await asyncio.wait_for(_tcp_answer(reader), 5) == (0, 1)
        finally:
            writer.close()
        # Requests it cannot skip: an error answer, then the connection closes.
        for request, message in [
            (tcp_request(make_keys(5), BF16), b"too many keys: 5 (at most 4 per fetch)"),
            (tcp_request(keys, BF16, magic=b"GET "), b"bad magic"),
            (tcp_request(keys, BF16, version=7), b"unsupported protocol version 7"),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(16), b"bad magic"),
        ]:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(request)
                status, text = await asyncio.wait_for(_tcp_answer(reader), 5)
                assert status == 1 and message in text, text
                assert await asyncio.wait_for(reader.read(), 5) == b""
            finally:
                writer.close()
        # A connection that sends half a request and goes away.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(tcp_request(keys, BF16)[:20])
        writer.close()
        data = KVDataClient()
        try:
            assert as_raw(await data.fetch_kv(data_address, keys, BF16, timeout_s=5)) == as_raw(entries)
        finally:
            await data.close()


# SMALL layers: 4 entries * 64 bytes = 256 bytes; pieces 1-3 of the honest script are the layers.
def _flip(frame: bytes) -> bytes:
    return frame[:TCP_LAYER.size] + bytes([frame[TCP_LAYER.size] ^ 1]) + frame[TCP_LAYER.size + 1:]


def _relayer(frame: bytes, **changes) -> bytes:
    magic, layer, length, data_checksum = TCP_LAYER.unpack(frame[:TCP_LAYER.size])
    fields = {"magic": magic, "layer": layer, "length": length, "data_checksum": data_checksum} | changes
    return tcp_layer(fields["layer"], frame[TCP_LAYER.size:], fields["length"], fields["data_checksum"],
                     fields["magic"])


TCP_MISBEHAVIOURS = {
    "length larger than the layer": (lambda m: m[:2] + [tcp_layer(1, m[2][TCP_LAYER.size:] + b"x" * 44)] + m[3:],
                                     "layer 1: announced 300 bytes, the layer has 256"),
    "length shorter than the layer": (lambda m: m[:2] + [tcp_layer(1, m[2][TCP_LAYER.size:200])] + m[3:],
                                      "layer 1: announced 176 bytes"),
    "wrong checksum": (lambda m: m[:2] + [_relayer(m[2], data_checksum=TCP_LAYER.unpack(m[2][:24])[3] ^ 1)] + m[3:],
                       "layer 1: checksum mismatch"),
    "flipped data byte": (lambda m: m[:2] + [_flip(m[2])] + m[3:], "layer 1: checksum mismatch"),
    "layers out of order": (lambda m: [m[0], m[2], m[1], m[3]], "sent layer 1 while layer 0 was expected"),
    "missing middle layer": (lambda m: [m[0], m[1], m[3]], "sent layer 2 while layer 1 was expected"),
    "count larger than requested": (lambda m: [tcp_header(5, SMALL)] + m[1:], "announced 5 entries for 4"),
    "other layout announced": (lambda m: [tcp_header(4, KVLayout(torch.bfloat16, SMALL.shape))] + m[1:],
                               "announced layout bfloat16"),
    "bad header magic": (lambda m: [tcp_header(4, SMALL, magic=b"HTTP")] + m[1:], "not a KV data header"),
    "other protocol version": (lambda m: [tcp_header(4, SMALL, version=2)] + m[1:], "protocol version 2"),
    "bad frame magic": (lambda m: m[:2] + [_relayer(m[2], magic=b"KVWX")] + m[3:], "layer 1: not a layer frame"),
    "an error answer": (lambda m: [tcp_error(3, b"internal error: boom")], "INTERNAL: internal error: boom"),
    "unknown status": (lambda m: [tcp_error(9, b"what")], "status 9: what"),
    "oversized error message": (lambda m: [tcp_error(1, b"", length=1 << 20)], "error message of 1048576 bytes"),
    "closed before the header": (lambda m: [], "closed during the header \\(0 of 40 bytes\\)"),
    "closed mid-header": (lambda m: [m[0][:10]], "closed during the header \\(10 of 40 bytes\\)"),
    "closed mid-layer": (lambda m: m[:2] + [m[2][:TCP_LAYER.size + 100]], "closed during layer 1 \\(100 of 256"),
    "closed mid-frame": (lambda m: m[:2] + [m[2][:7]], "closed during the frame of layer 1 \\(7 of 24"),
    "missing last layer": (lambda m: m[:3], "closed during the frame of layer 2 \\(0 of 24"),
    "closed mid-error message": (lambda m: [tcp_error(3, b"internal error: boom")[:45]], "closed during the error"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(TCP_MISBEHAVIOURS))
async def test_a_misbehaving_tcp_peer_is_a_transfer_error_and_its_connection_is_dropped(case):
    keys, entries = make_keys(4), random_entries(SMALL, 4)
    script = tcp_answer(entries)
    assert len(script) == 4
    mutate, problem = TCP_MISBEHAVIOURS[case]
    data = KVDataClient()
    try:
        async with ScriptedTCPPeer(mutate(script), close=True).serving() as address:
            with pytest.raises(TransferError, match=problem) as err:
                await data.fetch_kv(address, keys, SMALL, timeout_s=5, peer=f"peer-{case}")
            assert f"peer-{case}" in str(err.value)
            assert data.idle_connections(address) == 0
        honest = ScriptedTCPPeer(script)
        async with honest.serving() as address:  # the same script, honest, is accepted; the connection kept
            assert as_raw(await data.fetch_kv(address, keys, SMALL, timeout_s=5)) == as_raw(entries)
            assert as_raw(await data.fetch_kv(address, keys, SMALL, timeout_s=5)) == as_raw(entries)
            assert honest.connections == 1 and honest.requests == [tcp_request(keys, SMALL)] * 2
    finally:
        await data.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("stall_before", [0, 1, 2], ids=["before-header", "after-header", "mid-layer"])
async def test_a_stalling_tcp_peer_hits_the_deadline(stall_before):
    keys, entries = make_keys(4), random_entries(SMALL, 4)
    script = tcp_answer(entries)
    script = script[:2] + [script[2][:100], script[2][100:]] + script[3:]  # layer 1 in two pieces
    data = KVDataClient()
    try:
        async with ScriptedTCPPeer(script, stall_before=stall_before).serving() as address:
            with pytest.raises(TransferError, match=f"{address}: no complete answer within the 0.3 s deadline"):
                await asyncio.wait_for(data.fetch_kv(address, keys, SMALL, timeout_s=0.3), 10)
            assert data.idle_connections(address) == 0
    finally:
        await data.close()


@pytest.mark.asyncio
async def test_bytes_after_a_tcp_answer_are_never_read_as_the_next_one():
    keys, entries = make_keys(4), random_entries(SMALL, 4)
    script = tcp_answer(entries)
    peer = ScriptedTCPPeer(script[:-1] + [script[-1] + tcp_answer(entries)[0]])  # one header too many
    data = KVDataClient()
    try:
        async with peer.serving() as address:
            for _ in range(2):
                assert as_raw(await data.fetch_kv(address, keys, SMALL, timeout_s=5)) == as_raw(entries)
            assert peer.connections == 2  # the connection with unread bytes was not reused
    finally:
        await data.close()


@pytest.mark.asyncio
async def test_an_unreachable_data_plane_is_a_transfer_error_and_a_restarted_one_is_found_again():
    keys, entries = make_keys(2), random_entries(BF16, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    data = KVDataClient()
    with pytest.raises(DataPlaneUnreachableError, match=f"127.0.0.1:{port}.*cannot connect"):
        await data.fetch_kv(f"127.0.0.1:{port}", keys, BF16, timeout_s=5)
    await data.close()

    server, grpc_port = await serve_transfer(source_of(keys, entries))
    address = f"127.0.0.1:{grpc_port}"
    try:
        async with client_of(transport="tcp") as client:
            assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries)
            await server.data_server.stop()
            with pytest.raises(TransferError, match=f"{address}.*cannot connect"):
                await client.fetch_kv(address, keys, BF16, timeout_s=5)  # the pooled connection was closed too
            await server.data_server.start()  # on another port, which DataPort now announces
            assert server.data_port and (address not in client._data_ports)  # asked again on the next fetch
            assert as_raw(await client.fetch_kv(address, keys, BF16, timeout_s=5)) == as_raw(entries)
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_data_port_announces_the_data_server():
    keys, entries = make_keys(1), random_entries(BF16, 1)
    server, port = await serve_transfer(source_of(keys, entries))
    try:
        assert server.data_port and server.port == port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await kvtransfer_pb2_grpc.KVTransferStub(channel).DataPort(kvtransfer_pb2.DataPortRequest(),
                                                                                  timeout=5)
            assert response.port == server.data_port
    finally:
        await server.stop(None)
    assert server.data_port == 0


@pytest.mark.asyncio
async def test_auto_falls_back_to_grpc_for_a_peer_without_a_data_plane():
    keys, entries = make_keys(4), random_entries(SMALL, 4)
    # DataPort answers 0.
    async with serving(source_of(keys, entries), data_plane=False) as address, client_of() as client:
        assert as_raw(await client.fetch_kv(address, keys, SMALL, timeout_s=5)) == as_raw(entries)
        assert client._data_ports[address] == 0 and not client.data_client._idle
        async with client_of(transport="tcp") as tcp_only:
            with pytest.raises(TransferError, match=f"{address}: the peer has no TCP data plane"):
                await tcp_only.fetch_kv(address, keys, SMALL, timeout_s=5)
    # DataPort is UNIMPLEMENTED (a peer from before the data plane): the misbehaviour checks still apply.
    async with peer(ScriptedPeer(honest_messages(entries, chunk=100))) as address, client_of() as client:
        assert as_raw(await client.fetch_kv(address, keys, SMALL, timeout_s=5)) == as_raw(entries)
        assert client._data_ports[address] == 0
    async with peer(ScriptedPeer(MISBEHAVIOURS["wrong checksum"][0](honest_messages(entries, chunk=100)))) as address:
        async with client_of() as client:
            with pytest.raises(TransferError, match="layer 1: checksum mismatch"):
                await client.fetch_kv(address, keys, SMALL, timeout_s=5)
    # An unreachable peer: the DataPort call fails like a fetch would.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client_of() as client:
        with pytest.raises(TransferError, match=f"127.0.0.1:{port}.*UNAVAILABLE"):
            await client.fetch_kv(f"127.0.0.1:{port}", keys, SMALL, timeout_s=5)
    with pytest.raises(ValueError, match="transport"):
        TransferClient(transport="udp")


@pytest.mark.asyncio
async def test_a_tcp_peer_process_killed_mid_transfer_is_a_transfer_error():
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "kvstore" / "stalling_peer.py"), "--tcp"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30))
        async with client_of(transport="tcp") as client:
            fetch = asyncio.create_task(client.fetch_kv(f"127.0.0.1:{port}", make_keys(4), BF16, timeout_s=60))
            assert (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)).strip() == "sent layer 0"
            await asyncio.sleep(0.05)
            assert not fetch.done()
            proc.send_signal(signal.SIGKILL)
            with pytest.raises(TransferError, match="closed during the frame of layer 1|reset|failed") as err:
                await asyncio.wait_for(fetch, 10)  # long before the 60 s deadline
            assert str(port) in str(err.value)
            assert not any(client.data_client._idle.values())
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


class _GatedSource(TensorSource):
    """Answers a request only once `gate` is set; `entered` says a request is being answered."""

    def __init__(self, entries) -> None:
        super().__init__(entries)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def export(self, keys, layout):
        self.entered.set()
        await self.gate.wait()
        return await super().export(keys, layout)


@pytest.mark.asyncio
async def test_stopping_the_data_server_lets_answers_in_flight_finish():
    layout = KVLayout(torch.bfloat16, (2, 4, 8, 16, 64))
    keys, entries = make_keys(32), random_entries(layout, 32, seed=5)
    source = _GatedSource(dict(zip(keys, entries)))
    server = KVDataServer(source)
    port = await server.start()
    data = KVDataClient()
    try:
        fetch = asyncio.create_task(data.fetch_kv(f"127.0.0.1:{port}", keys, layout, timeout_s=10))
        await asyncio.wait_for(source.entered.wait(), 10)  # the request is being answered, held at the gate
        stopping = asyncio.create_task(server.stop(grace=5))
        await asyncio.sleep(0.05)  # the stop has begun while the answer is in flight
        assert not stopping.done()
        source.gate.set()
        await stopping
        assert as_raw(await fetch) == as_raw(entries)
        with pytest.raises(DataPlaneUnreachableError):
            await data.fetch_kv(f"127.0.0.1:{port}", keys, layout, timeout_s=5)
    finally:
        await data.close()
        await server.stop()
