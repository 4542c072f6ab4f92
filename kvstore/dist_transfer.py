"""Node-to-node KV transfer over torch.distributed point-to-point: the server end (`DistServer`,
which a KVTransferService serves `DistConnect` and `DistFetch` with); the client end is
kvstore/dist_client.py, the torch.distributed calls kvstore/dist_group.py.

Pairs. There is no global process group: each (client process, server process) pair that moves
KV builds its own two-rank group (server rank 0, client rank 1) on first use, and the client
caches it per peer address. The client opens it with `DistConnect`, a server stream: the server
opens (once) a TCPStore on a free port of its advertised host and answers the store's address and
a fresh random pair id, the key prefix of the pair in the store; both sides then build the group
over it (gloo here; the backend is the request's). The stream stays open as long as the pair
lives: a client that drops the pair (or whose process dies) ends it, and the server drops its
side; a server that drops a pair ends the stream, and the client drops its side.

Fetches. `DistFetch` carries the pair id, a tag and a FetchRequest (keys and layout), validated
as the other transports do, with the same statuses (INVALID_ARGUMENT, FAILED_PRECONDITION,
INTERNAL). The server exports the leading run of held keys from its KVSource, stores it
layer-major (no copy when the source exports it so), posts one send per layer with the request's
tag, and only then answers n, the layout and each layer's XXH3-64; the client receives each layer
into its output and verifies it. Concurrent fetches on one pair use distinct tags (the client
numbers them; the server refuses a tag already in flight on the pair): gloo matches sends and
receives by tag, so they never mix, and neither waits for the other's round trip and export (a
per-pair lock would serialise those too). NOT_FOUND (an unknown pair: the server restarted or
dropped it) and ABORTED (the pair's connection broke before anything was sent) tell the client to
build a new pair and ask again.

Threads and failures. Every blocking group call (building a group, waiting for a send or a
receive) runs in a thread of the side's own pool, never on the event loop, with a timeout: the
server waits for its sends until the client's deadline (at most `send_timeout_s`), so a stuck or
vanished client frees its thread at that deadline; a send that fails or times out drops the pair.
A peer process that dies fails the other side's pending sends and receives within milliseconds.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from kvstore import dist_group
from kvstore.codec import KVLayout, as_bytes, checksum
from kvstore.transfer_source import KVSource, export_entries, layout_to_proto, to_layer_major
from kvweave.v1 import kvtransfer_pb2

logger = logging.getLogger(__name__)

MAX_TAG = 2**31 - 1
"""Tags are 1..MAX_TAG (gloo takes a non-negative int32; 0 is never used)."""
DEFAULT_CONNECT_TIMEOUT_S = 30.0
MAX_CONNECT_TIMEOUT_S = 60.0


def layer_views(payload: torch.Tensor) -> torch.Tensor:
    """[n_layers, layer bytes] uint8 over a layer-major [n, *shape] tensor: what goes on the wire."""
    n_layers = payload.shape[2]
    return payload.movedim(2, 0).reshape(n_layers, -1).view(torch.uint8)


def wait_all(works: list, deadline: float, backend: str = "gloo") -> None:
    """Wait for every Work in turn until the monotonic `deadline` (GroupError on failure)."""
    for work in works:
        dist_group.wait(work, deadline - time.monotonic(), backend)


class _ServerPair:
    __slots__ = ("pair_id", "backend", "group", "closed", "tags")

    def __init__(self, pair_id: str, backend: str, group: asyncio.Future) -> None:
        self.pair_id = pair_id
        self.backend = backend
        self.group = group  # resolves to the built group (rank 0)
        self.closed = asyncio.Event()
        self.tags: set[int] = set()  # tags of the fetches whose sends are in flight


class DistServer:
    """The server end of the dist transport for one KVTransferService (give it as `dist_server`).

    `host`: the advertised host, where the store and the group's connections listen. `max_pairs`:
    client pairs held at once (RESOURCE_EXHAUSTED past it). `send_timeout_s`: longest wait for a
    client to take a fetch's layers. `on_served(nbytes, seconds)`: after each fetch fully sent.
    `device`: where the source's KV lives; an NCCL pair's fetches ask the source for entries on
    it (`export(..., on_device=True)`) when it is a GPU, so they never pass through host memory."""

    def __init__(self, source: KVSource, host: str = "127.0.0.1", max_pairs: int = 256, send_timeout_s: float = 60.0,
                 max_threads: int = 32, on_served: Callable[[int, float], None] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if max_pairs <= 0 or max_threads <= 0 or not send_timeout_s > 0:
            raise ValueError("max_pairs, max_threads and send_timeout_s must be positive")
        self.source = source
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.max_pairs = max_pairs
        self.send_timeout_s = send_timeout_s
        self.on_served = on_served
        self.device = torch.device(device)
        self._pairs: dict[str, _ServerPair] = {}
        self._store = None
        self._store_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="kv-dist-server")
        self._sending: set[asyncio.Task] = set()
        self._closed = False

    @property
    def num_pairs(self) -> int:
        return len(self._pairs)

    async def _get_store(self):
        async with self._store_lock:
            if self._store is None:
                loop = asyncio.get_running_loop()
                self._store = await loop.run_in_executor(self._executor, dist_group.open_store, self.host,
                                                         MAX_CONNECT_TIMEOUT_S)
            return self._store

    async def connect(self, request: kvtransfer_pb2.DistConnectRequest, context: grpc.aio.ServicerContext):
        """The DistConnect stream: the rendezvous, then open until the pair is dropped."""
        backend = request.backend or "gloo"
        if backend not in dist_group.available_backends():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown backend {backend!r}; this server "
                                                                  f"offers {', '.join(dist_group.available_backends())}")
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
        if len(self._pairs) >= self.max_pairs:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"holds {self.max_pairs} pairs already")
        try:
            store = await self._get_store()
        except dist_group.GroupError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"cannot open a store: {dist_group.error_text(e)}")
        timeout_s = min(request.connect_timeout_ms / 1000 or DEFAULT_CONNECT_TIMEOUT_S, MAX_CONNECT_TIMEOUT_S)
        pair_id = secrets.token_hex(16)  # 128 bits: the store prefix of a pair, given only over authenticated gRPC
        loop = asyncio.get_running_loop()
        group = loop.run_in_executor(self._executor, dist_group.new_pair_group, store, pair_id, 0, backend, self.host,
                                     timeout_s)
        pair = self._pairs[pair_id] = _ServerPair(pair_id, backend, group)
        try:
            yield kvtransfer_pb2.DistConnectResponse(store_host=self.host, store_port=store.port, pair_id=pair_id)
            try:
                await asyncio.shield(group)
            except dist_group.GroupError as e:
                logger.info("KV pair %s: the client did not join: %s", pair_id, dist_group.error_text(e))
                return
            await pair.closed.wait()
        finally:
            self.drop(pair_id)

    def drop(self, pair_id: str) -> None:
        """Forget a pair and end its DistConnect stream; its connection closes once the sends in
        flight on it are done."""
        pair = self._pairs.pop(pair_id, None)
        if pair is not None:
            pair.closed.set()
            if pair.backend == "nccl" and pair.group.done() and not pair.group.exception():
                dist_group.abort(pair.group.result(), pair.backend)

    async def fetch(self, pair_id: str, tag: int, keys: list[bytes], layout: KVLayout,
                    context: grpc.aio.ServicerContext) -> kvtransfer_pb2.DistFetchResponse:
        """DistFetch of valid keys and layout: post the sends, then answer."""
        t0 = time.perf_counter()
        pair = self._pairs.get(pair_id)
        if pair is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown pair {pair_id!r} (dropped, or opened by "
                                                           f"another server)")
        if not 0 < tag <= MAX_TAG:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tag must be in [1, {MAX_TAG}], got {tag}")
        if tag in pair.tags:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tag {tag} is in use by another fetch of the pair")
        on_device = pair.backend == "nccl" and self.device.type == "cuda"
        entries, error = await export_entries(self.source, keys, layout, on_device=on_device)
        if error is not None:
            await context.abort(grpc.StatusCode[error[0]], error[1])
        if entries is None:
            return kvtransfer_pb2.DistFetchResponse(num_entries=0, layout=layout_to_proto(layout))
        remaining = context.time_remaining()  # the client's deadline (None or huge without one)
        deadline = time.monotonic() + min(self.send_timeout_s, self.send_timeout_s if remaining is None else remaining)
        pair.tags.add(tag)
        try:
            group = await asyncio.wait_for(asyncio.shield(pair.group), max(deadline - time.monotonic(), 0))
            loop = asyncio.get_running_loop()
            checksums, works = await loop.run_in_executor(self._executor, self._post, group, pair.backend, entries, tag)
        except (dist_group.GroupError, asyncio.TimeoutError) as e:
            pair.tags.discard(tag)
            self.drop(pair_id)
            problem = dist_group.error_text(e) if isinstance(e, dist_group.GroupError) else "not connected in time"
            await context.abort(grpc.StatusCode.ABORTED, f"pair {pair_id} is broken: {problem}")
        except BaseException:
            pair.tags.discard(tag)
            raise
        nbytes = entries.numel() * entries.element_size()
        task = asyncio.create_task(self._finish(pair, tag, works, deadline, nbytes, t0))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return kvtransfer_pb2.DistFetchResponse(num_entries=entries.shape[0], layout=layout_to_proto(layout),
                                                layer_checksums=checksums)

    def _post(self, group, backend: str, entries: torch.Tensor, tag: int) -> tuple[list[int], list]:
        """(each layer's checksum, the posted sends), in a pool thread. An NCCL pair's layers carry
        no checksums: they never leave GPU memory, and hashing them would copy them to the host."""
        payload = to_layer_major(entries.detach().to(dist_group.payload_device(backend)))
        layers = layer_views(payload)
        if payload.device.type == "cuda":
            torch.cuda.synchronize(payload.device)  # the export's copies ran on whatever stream exported them
            return [], [dist_group.send(group, layer, 1, tag) for layer in layers]
        checksums = [checksum(as_bytes(layer)) for layer in layers]
        return checksums, [dist_group.send(group, layer, 1, tag) for layer in layers]

    async def _finish(self, pair: _ServerPair, tag: int, works: list, deadline: float, nbytes: int, t0: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, wait_all, works, deadline, pair.backend)
        except dist_group.GroupError as e:
            logger.info("KV pair %s: sending tag %d failed (%s); dropping the pair", pair.pair_id, tag,
                        dist_group.error_text(e))
            self.drop(pair.pair_id)
            return
        finally:
            pair.tags.discard(tag)
        if self.on_served is not None:
            self.on_served(nbytes, time.perf_counter() - t0)

    def close(self) -> None:
        """Drop every pair (ending their streams) and refuse new ones. Sends in flight finish in
        their threads, within their deadlines."""
        self._closed = True
        for pair_id in list(self._pairs):
            self.drop(pair_id)
        self._executor.shutdown(wait=False)
        self._store = None
