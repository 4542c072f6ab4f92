"""The client end of the dist KV transport: `DistClient` fetches KV from peers over two-rank
torch.distributed groups, one per peer process, built on first use through the peer's
`DistConnect` and cached (kvstore/dist_transfer.py describes the protocol and the server).

A fetch asks `DistFetch` over gRPC for the count and the layers' checksums, then receives the
layers in a pool thread: straight into a fresh layer-major output, or, given `out`, into two
staging layers that are verified and copied into it in turn. Every wait has the call's deadline
as its timeout. A failure (the peer died, the deadline passed, a checksum mismatch, an answer
that fails a check, a rendezvous that cannot complete) raises `TransferError` naming the peer and
drops the pair: the next fetch builds a new one.

What happens to a receive that hangs: the asyncio side gives up at the deadline, and the thread's
wait times out at the same deadline (which also breaks the pair's connection, so the server's
sends fail and it drops its side): no thread outlives the call's deadline by more than gloo's
timeout slack. A cancelled fetch drops the pair at once; its thread runs out as above, and never
writes into a given `out` after the cancellation (it checks under a lock before each copy).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import torch

from kvstore import dist_group
from kvstore.codec import KVLayout, as_bytes, checksum
from kvstore.dist_transfer import MAX_TAG, layer_views
from kvstore.transfer_source import (TransferError, empty_entries, empty_layer_major, layer_geometry,
                                     layout_from_proto, layout_to_proto, short_message)
from kvweave.v1 import kvtransfer_pb2

logger = logging.getLogger(__name__)

_SERVICE = kvtransfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name
DIST_CONNECT_METHOD = f"/{_SERVICE}/DistConnect"
DIST_FETCH_METHOD = f"/{_SERVICE}/DistFetch"
_KEEP_PAIR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL}
"""Errors answered before anything was sent: the pair stays usable."""
_STALE_PAIR = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED}
"""Errors that mean: build a new pair and ask again (nothing was sent)."""


class _StalePair(Exception):
    pass


class _ClientPair:
    __slots__ = ("pair_id", "group", "store", "call", "watcher", "next_tag", "one_at_a_time")

    def __init__(self, pair_id: str, group, store, call, backend: str) -> None:
        self.pair_id, self.group, self.store, self.call = pair_id, group, store, call
        self.watcher: asyncio.Task | None = None
        self.next_tag = 0
        # NCCL matches sends and receives by order, not tag: one fetch at a time on the pair
        self.one_at_a_time = asyncio.Lock() if backend == "nccl" else None

    def take_tag(self) -> int:
        self.next_tag = self.next_tag % MAX_TAG + 1
        return self.next_tag


def _rpc_problem(e: grpc.aio.AioRpcError, timeout_s: float) -> str:
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no complete answer within the {timeout_s:.3g} s deadline"
    return f"{e.code().name}: {short_message(e.details() or 'no details')}"


class DistClient:
    """Fetches KV over torch.distributed pairs (`backend`), one per peer address, for at most
    `max_peers` addresses (least recently used dropped first). Used by `TransferClient(transport=
    "dist")`, which gives it the peer's gRPC channel. Pairs belong to the event loop that built them."""

    def __init__(self, backend: str = "gloo", max_peers: int = 64, max_threads: int = 32) -> None:
        dist_group.check_backend(backend)
        if max_peers <= 0 or max_threads <= 0:
            raise ValueError("max_peers and max_threads must be positive")
        self.backend = backend
        self.max_peers = max_peers
        self._pairs: OrderedDict[str, _ClientPair] = OrderedDict()
        self._connecting: dict[str, asyncio.Task] = {}
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="kv-dist-client")

    def pair_id(self, address: str) -> str | None:
        """The id of the cached pair with the peer at `address` (None: none)."""
        pair = self._pairs.get(address)
        return pair.pair_id if pair is not None else None

    async def fetch_kv(self, channel: grpc.aio.Channel, peer: str, keys: list[bytes], layout: KVLayout,
                       timeout_s: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, *layout.shape] from the peer serving KVTransfer on `channel` (its address `peer`),
        as `TransferClient.fetch_kv` (arguments already checked, `keys` not empty)."""
        deadline = time.monotonic() + timeout_s
        for attempt in range(2):
            pair = await self._pair(channel, peer, deadline, timeout_s)
            try:
                return await self._fetch_on(channel, pair, peer, keys, layout, deadline, timeout_s, out)
            except _StalePair as e:
                self.drop(peer, pair)
                if attempt:
                    raise TransferError(f"KV fetch from {peer}: {e}") from None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------- pairs

    async def _pair(self, channel, peer: str, deadline: float, timeout_s: float) -> _ClientPair:
        pair = self._pairs.get(peer)
        if pair is not None:
            self._pairs.move_to_end(peer)
            return pair
        task = self._connecting.get(peer)
        if task is None:  # ours: it ends by our deadline (shielded: a cancelled caller leaves it to the others)
            task = self._connecting[peer] = asyncio.create_task(self._connect(channel, peer, deadline, timeout_s))
            task.add_done_callback(lambda t: self._connected(peer, t))
            return await asyncio.shield(task)
        try:  # another fetch's, which may end after our deadline
            return await asyncio.wait_for(asyncio.shield(task), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise TransferError(f"KV fetch from {peer}: no pair built within the {timeout_s:.3g} s deadline") from None

    def _connected(self, peer: str, task: asyncio.Task) -> None:
        if self._connecting.get(peer) is task:
            del self._connecting[peer]
        if not task.cancelled():
            task.exception()  # retrieved here: the fetches that awaited it report it

    async def _connect(self, channel, peer: str, deadline: float, timeout_s: float) -> _ClientPair:
        remaining = max(deadline - time.monotonic(), 0.001)
        method = channel.unary_stream(DIST_CONNECT_METHOD,
                                      request_serializer=kvtransfer_pb2.DistConnectRequest.SerializeToString,
                                      response_deserializer=kvtransfer_pb2.DistConnectResponse.FromString)
        call = method(kvtransfer_pb2.DistConnectRequest(backend=self.backend,
                                                        connect_timeout_ms=max(int(remaining * 1000), 1)))
        try:
            try:
                answer = await asyncio.wait_for(call.read(), remaining)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise TransferError(f"KV fetch from {peer}: the peer does not serve the torch.distributed "
                                        f"transport (DistConnect is UNIMPLEMENTED)") from None
                raise TransferError(f"KV fetch from {peer}: rendezvous: {_rpc_problem(e, timeout_s)}") from None
            except asyncio.TimeoutError:
                raise TransferError(f"KV fetch from {peer}: rendezvous: no answer within the {timeout_s:.3g} s "
                                    f"deadline") from None
            if answer is grpc.aio.EOF:
                raise TransferError(f"KV fetch from {peer}: rendezvous: the stream ended without an answer")
            where = f"{answer.store_host}:{answer.store_port}"
            loop = asyncio.get_running_loop()
            build = loop.run_in_executor(self._executor, self._build, answer, deadline)
            try:
                group, store = await asyncio.wait_for(build, max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise TransferError(f"KV fetch from {peer}: rendezvous through {where}: not complete within "
                                    f"the {timeout_s:.3g} s deadline") from None
            except (dist_group.GroupError, OSError) as e:
                raise TransferError(f"KV fetch from {peer}: rendezvous through {where} failed: "
                                    f"{dist_group.error_text(e)}") from None
        except BaseException:
            call.cancel()
            raise
        pair = self._pairs[peer] = _ClientPair(answer.pair_id, group, store, call, self.backend)
        pair.watcher = asyncio.create_task(self._watch(peer, pair))
        while len(self._pairs) > self.max_peers:
            old_peer, old = next(iter(self._pairs.items()))
            self.drop(old_peer, old)
        return pair

    def _build(self, answer: kvtransfer_pb2.DistConnectResponse, deadline: float):
        store = dist_group.connect_store(answer.store_host, answer.store_port, deadline - time.monotonic())
        local = dist_group.local_host_for(answer.store_host)
        group = dist_group.new_pair_group(store, answer.pair_id, 1, self.backend, local, deadline - time.monotonic())
        return group, store

    async def _watch(self, peer: str, pair: _ClientPair) -> None:
        """Drop the pair when the server ends its DistConnect stream (it dropped the pair or is gone)."""
        try:
            while await pair.call.read() is not grpc.aio.EOF:
                pass
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        if self._pairs.get(peer) is pair:
            logger.debug("KV pair %s with %s ended by the server", pair.pair_id, peer)
            self.drop(peer, pair)

    def drop(self, peer: str, pair: _ClientPair | None = None) -> None:
        """Forget the pair with `peer` (only if it is `pair`, when given) and end its stream, so
        that the server drops its side; its connection closes once no receive is pending on it."""
        current = self._pairs.get(peer)
        if current is None or (pair is not None and current is not pair):
            return
        del self._pairs[peer]
        current.call.cancel()
        dist_group.abort(current.group, self.backend)
        if current.watcher is not None and current.watcher is not asyncio.current_task():
            current.watcher.cancel()

    async def close(self) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
        await asyncio.gather(*self._connecting.values(), return_exceptions=True)
        for peer in list(self._pairs):
            self.drop(peer)
        self._executor.shutdown(wait=False)

    # ------------------------------------------------------------------------------ fetches

    async def _fetch_on(self, channel, pair: _ClientPair, peer: str, keys: list[bytes], layout: KVLayout,
                        deadline: float, timeout_s: float, out: torch.Tensor | None) -> torch.Tensor:
        if pair.one_at_a_time is None:
            return await self._fetch_one(channel, pair, peer, keys, layout, deadline, timeout_s, out)
        try:
            await asyncio.wait_for(pair.one_at_a_time.acquire(), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise TransferError(f"KV fetch from {peer}: the pair was busy past the {timeout_s:.3g} s deadline") from None
        try:
            return await self._fetch_one(channel, pair, peer, keys, layout, deadline, timeout_s, out)
        finally:
            pair.one_at_a_time.release()

    async def _fetch_one(self, channel, pair: _ClientPair, peer: str, keys: list[bytes], layout: KVLayout,
                         deadline: float, timeout_s: float, out: torch.Tensor | None) -> torch.Tensor:
        fetch = channel.unary_unary(DIST_FETCH_METHOD,
                                    request_serializer=kvtransfer_pb2.DistFetchRequest.SerializeToString,
                                    response_deserializer=kvtransfer_pb2.DistFetchResponse.FromString)
        tag = pair.take_tag()
        request = kvtransfer_pb2.DistFetchRequest(pair_id=pair.pair_id, tag=tag, fetch=kvtransfer_pb2.FetchRequest(
            keys=keys, layout=layout_to_proto(layout)))
        try:
            answer = await fetch(request, timeout=max(deadline - time.monotonic(), 0.001))
        except grpc.aio.AioRpcError as e:
            if e.code() in _STALE_PAIR:
                raise _StalePair(_rpc_problem(e, timeout_s)) from None
            if e.code() not in _KEEP_PAIR:
                self.drop(peer, pair)
            raise TransferError(f"KV fetch from {peer}: {_rpc_problem(e, timeout_s)}") from None
        receive = _Receive(pair.group, self.backend, tag, peer, len(keys), layout, out, deadline, timeout_s)
        try:
            n = receive.check(answer)
            if n == 0:
                return empty_entries(0, layout) if out is None else out[:0]
            loop = asyncio.get_running_loop()
            return await asyncio.wait_for(loop.run_in_executor(self._executor, receive.run),
                                          max(deadline - time.monotonic(), 0) + 0.5)  # the thread times out first
        except BaseException as e:
            receive.cancel()
            self.drop(peer, pair)
            if isinstance(e, asyncio.TimeoutError):
                raise receive.fail(f"no complete answer within the {timeout_s:.3g} s deadline") from None
            raise


class _Receive:
    """One fetch's answer: its checks, and the receiving of its layers (`run`, in a pool thread)."""

    def __init__(self, group, backend: str, tag: int, peer: str, requested: int, layout: KVLayout,
                 out: torch.Tensor | None, deadline: float, timeout_s: float) -> None:
        self.group, self.tag, self.peer, self.requested, self.layout = group, tag, peer, requested, layout
        self.backend = backend
        self.given_out, self.deadline, self.timeout_s = out, deadline, timeout_s
        self.n = 0
        self.checksums: list[int] = []
        self.lock = threading.Lock()  # held while copying into `out`; `cancelled` is checked under it
        self.cancelled = False

    def fail(self, problem: str) -> TransferError:
        return TransferError(f"KV fetch from {self.peer}: {problem}")

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True

    def check(self, answer: kvtransfer_pb2.DistFetchResponse) -> int:
        n = answer.num_entries
        if n > self.requested:
            raise self.fail(f"announced {n} entries for {self.requested} requested keys")
        try:
            layout = layout_from_proto(answer.layout)
        except ValueError as e:
            raise self.fail(f"announced an invalid layout: {e}") from None
        if layout != self.layout:
            raise self.fail(f"announced layout {layout}, requested {self.layout}")
        expected = self.layout.shape[1] if n and self.backend != "nccl" else 0  # NCCL: none (see DistServer._post)
        if len(answer.layer_checksums) != expected:
            raise self.fail(f"announced {len(answer.layer_checksums)} layer checksums for {expected} layers")
        self.n, self.checksums = n, list(answer.layer_checksums)
        return n

    def _wait(self, work, layer: int) -> None:
        try:
            dist_group.wait(work, self.deadline - time.monotonic(), self.backend)
        except dist_group.GroupError as e:
            if time.monotonic() >= self.deadline - 0.01:
                raise self.fail(f"no complete answer within the {self.timeout_s:.3g} s deadline "
                                f"(receiving layer {layer})") from None
            raise self.fail(f"receiving layer {layer}: {dist_group.error_text(e)}") from None

    def _verify(self, data: torch.Tensor, layer: int) -> None:
        if self.checksums and checksum(as_bytes(data)) != self.checksums[layer]:
            raise self.fail(f"layer {layer}: checksum mismatch")

    def run(self) -> torch.Tensor:
        if self.given_out is None:
            return self._run_in_place()
        if self.backend == "nccl":
            received = self._run_in_place()
            with self.lock:
                if self.cancelled:
                    raise self.fail("cancelled")
                return self.given_out[:self.n].copy_(received)
        return self._run_staged()

    def _run_in_place(self) -> torch.Tensor:
        """Every layer straight into its slice of a fresh layer-major output (on the GPU for NCCL)."""
        out = empty_layer_major(self.n, self.layout, dist_group.payload_device(self.backend))
        layers = layer_views(out)
        works = [dist_group.recv(self.group, layer, 0, self.tag) for layer in layers]
        for i, (work, layer) in enumerate(zip(works, layers)):
            self._wait(work, i)
            self._verify(layer, i)
        return out

    def _run_staged(self) -> torch.Tensor:
        """Layers into two staging buffers in turn (one receives while the other is copied out)."""
        n_layers, rows_per_entry, row_bytes = layer_geometry(self.layout)
        rows = self.n * rows_per_entry
        out = self.given_out[:self.n]
        dst = out.view(torch.uint8).numpy().reshape(rows, n_layers, row_bytes)
        staging = [torch.from_numpy(np.empty(rows * row_bytes, dtype=np.uint8)) for _ in range(min(2, n_layers))]
        works = [dist_group.recv(self.group, staging[i], 0, self.tag) for i in range(len(staging))]
        for layer in range(n_layers):
            buf = staging[layer % 2]
            self._wait(works[layer % 2], layer)
            self._verify(buf, layer)
            with self.lock:
                if self.cancelled:
                    raise self.fail("cancelled")
                np.copyto(dst[:, layer], buf.numpy().reshape(rows, row_bytes))
            if layer + 2 < n_layers:
                works[layer % 2] = dist_group.recv(self.group, buf, 0, self.tag)
        return out
