"""Asyncio front of the engine: the engine steps in one background thread; callers stream.

All engine state is touched only by the engine thread. Callers tokenize and validate in their
own thread (`LLMEngine.make_request`, so bad input fails at once with InvalidRequestError), then
hand the request over through a queue; outputs come back to each caller's asyncio queue with
`call_soon_threadsafe`. A caller that stops listening (cancelled, or the stream closed) aborts
its request. A failure inside a step fails the requests in flight with an error and the loop
keeps serving new ones.

For the worker server, the engine thread also publishes after every loop turn (a) a load snapshot,
an immutable `WorkerLoad` swapped in by reference, and (b) the KV events of every tier (device,
DRAM, SSD), appended to a bounded deque that one consumer drains with `take_kv_events`.
`get_cached_hashes` computes a full snapshot of every tier inside the engine thread and, in the
same turn, drops the events still pending, so "snapshot, then the events taken after it" is
always the exact cache state. `export` copies KV blocks out for a peer inside the engine thread
(between steps), so a block is never read while it is being reused. An optional `prefetch`
coroutine runs for each request before it enters the engine (worker/kv_prefetch.py stages KV
from SSD and peers there, so the engine thread never waits on I/O).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from kvweave.registry import WorkerLoad
from kvstore.keys import BlockHash
from kvstore.codec import KVLayout
from kvstore.events import BlockRemoved, BlockStored
from kvstore.transfer_source import KVLayoutMismatchError
from kvweave.vision_prompt import has_image_parts
from worker.engine import LLMEngine, Prompt
from worker.kv_connector_worker import StagedKV
from worker.kv_handoff import Handoff
from worker.output import RequestOutput
from worker.request import Request, RequestStatus
from worker.tp_executor import TPGroupError
from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_PENDING_KV_EVENTS = 100_000
"""Past this many undrained events (a stalled publisher) they are dropped for a snapshot."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, enable_kv_events: bool = False) -> None:
        """`enable_kv_events`: keep KV events for `take_kv_events` (else they are discarded)."""
        self.engine = engine
        self.enable_kv_events = enable_kv_events
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._kv_events: deque[BlockStored | BlockRemoved] = deque()
        self._kv_events_dropped = False
        self._load = compute_load(engine)
        self._idle = True
        self.prefetch: Callable[[Request], Awaitable[StagedKV]] | None = None
        """Runs for each request before it is queued; stages KV it can reuse."""
        self.on_fatal: Callable[[BaseException], None] | None = None
        """Called from the engine thread when the engine cannot go on (a tensor-parallel rank died);
        the engine thread has stopped."""
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvweave-engine", daemon=True)
        self._thread.start()

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, req_id: str | None = None,
                       cache_namespace: str = "", chunk_spans: Sequence[tuple[int, int]] = (),
                       prefill_only: bool = False, handoff: Handoff | None = None, images: Sequence[bytes] = (),
                       embedding_holders: Sequence[tuple[str, str]] = ()) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each with the new delta); raises InvalidRequestError at once.
        `chunk_spans`: (start, length) token spans of the prompt that are reusable chunks;
        `prefill_only` / `handoff`: the two halves of a disaggregated request (worker/kv_handoff.py);
        `images`: the encoded images its placeholders name (their embeddings staged by `prefetch`,
        else encoded in a thread; never on the event loop or the engine thread), and
        `embedding_holders` where the router says their embeddings are held."""
        make = functools.partial(self.engine.make_request, prompt, params, req_id, cache_namespace, chunk_spans,
                                 prefill_only=prefill_only, handoff=handoff, images=images,
                                 embedding_holders=embedding_holders)
        with_images = images or (isinstance(prompt, dict) and has_image_parts(prompt.get("messages")))
        req = await asyncio.to_thread(make) if with_images else make()
        if req.req_id in self._streams:
            raise InvalidRequestError(f"request id {req.req_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[req.req_id] = stream
        finished = False
        try:
            if req.images is not None and self.prefetch is None:  # encoded here, off the engine thread
                await asyncio.to_thread(self.engine.embed_images, req)
            staged = await self.prefetch(req) if self.prefetch is not None else None
            self._commands.put(("add", (req, staged)))
            while not finished:
                out = await stream.queue.get()
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(req.req_id, None)
            if not finished:
                self._commands.put(("abort", req.req_id))

    async def flush_kv_events(self) -> None:
        """Hand the KV events of every tier over to `take_kv_events` now (not after the engine
        thread's next turn, up to half a second away when it is idle)."""
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("flush", future))
        await future

    async def release_handoff(self, handoff_id: str) -> bool:
        """Free a handoff's blocks (a decode worker has its KV); False when unknown or expired."""
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("release", (handoff_id, future)))
        return await future

    def abort(self, req_id: str) -> bool:
        """Abort a request; returns whether it was in flight (its stream then ends with "abort")."""
        found = req_id in self._streams
        self._commands.put(("abort", req_id))
        return found

    @property
    def idle(self) -> bool:
        """After the engine thread's latest turn: no request in flight and no KV job unfinished
        (write-through saves, chunk-caches being stored)."""
        return self._idle and not self._streams

    def get_load(self) -> WorkerLoad:
        """The load after the engine thread's latest turn (safe from any thread; do not mutate)."""
        return self._load

    def take_kv_events(self) -> list[BlockStored | BlockRemoved] | None:
        """The KV events since the last take, in order; None when some had to be dropped (too many
        piled up), in which case the caller must publish `get_cached_hashes` instead. One consumer."""
        if self._kv_events_dropped:
            return None  # until get_cached_hashes resets it in the engine thread
        events = []
        try:
            while self._kv_events:
                events.append(self._kv_events.popleft())
        except IndexError:  # cleared by a concurrent snapshot
            pass
        return events

    async def get_cached_hashes(self) -> dict[str, list[BlockHash]]:
        """Every key each tier holds now, by medium; pending KV events are dropped (computed in
        the engine thread, so later `take_kv_events` results apply on top of this snapshot)."""
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("snapshot", future))
        return await future

    async def export(self, keys: list[bytes], layout: KVLayout, on_device: bool = False):
        """The leading `keys` this worker holds in any tier, as one tensor [n, *layout.shape], or
        None (a KVSource for kvstore.transfer), in host memory or, `on_device`, in the KV cache's
        device memory. KVLayoutMismatchError when `layout` is not this engine's."""
        if layout != self.engine.connector.layout:
            raise KVLayoutMismatchError(f"this worker holds KV blocks of {self.engine.connector.layout}, asked for {layout}")
        pinned = self.engine.handoffs.pin(keys)
        if pinned is not None:  # a held handoff's blocks never change: read them now, off the engine thread
            handoff_id, block_ids = pinned
            try:
                return await asyncio.to_thread(self.engine.connector.export_blocks, block_ids, on_device)
            finally:
                self.engine.handoffs.unpin(handoff_id)
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("export", (keys, on_device, future)))
        return await future

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)
        self.engine.close()

    def _deliver(self, req_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(req_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _apply(self, cmd: str, arg) -> None:
        if cmd == "add":
            req, staged = arg
            try:
                self.engine.submit(req, staged)
            except ValueError as e:
                self._deliver(req.req_id, e)
        elif cmd == "abort":
            out = self.engine.abort_request(arg)
            if out is not None:
                self._deliver(arg, out)
        elif cmd == "snapshot":
            self.engine.take_kv_events()
            self._kv_events.clear()
            self._kv_events_dropped = False
            _resolve(arg, self.engine.connector.snapshot())
        elif cmd == "flush":  # hand over the KV events now (an Encode call publishes before it answers)
            self._publish()
            _resolve(arg, None)
        elif cmd == "release":
            handoff_id, future = arg
            _resolve(future, self.engine.release_handoff(handoff_id))
        elif cmd == "export":
            keys, on_device, future = arg
            try:
                _resolve(future, self.engine.connector.export(keys, on_device))
            except Exception as e:  # never take the engine thread down for a peer's request
                logger.exception("KV export failed")
                _resolve(future, e)

    def _publish(self) -> None:
        """Engine thread, after each turn: swap in the load and hand over the KV events."""
        events = self.engine.take_kv_events()
        if events and self.enable_kv_events and not self._kv_events_dropped:
            if len(self._kv_events) + len(events) > MAX_PENDING_KV_EVENTS:
                logger.warning("%d KV events not taken; dropping them for a snapshot", len(self._kv_events))
                self._kv_events_dropped = True
            else:
                self._kv_events.extend(events)
        self._load = compute_load(self.engine)
        self._idle = not self.engine.has_unfinished()

    def _run(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished()
            try:
                while True:  # drain commands; wait for one only when idle
                    self._apply(*self._commands.get(block=block, timeout=0.5 if block else None))
                    block = False
            except queue.Empty:
                pass
            if self.engine.has_unfinished():
                self._step()
            self.engine.expire_handoffs()
            self._publish()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug must not take the server down: fail what was in flight
            logger.exception("engine step failed; failing %d requests", len(self.engine.scheduler.requests))
            for req_id in list(self.engine.scheduler.requests):
                self.engine.abort_request(req_id)
                self._deliver(req_id, RuntimeError(f"engine step failed: {e}"))
            if isinstance(e, TPGroupError):  # a rank is gone: no later step can run either
                self._stopped.set()
                if self.on_fatal is not None:
                    self.on_fatal(e)
            return
        for out in outputs:
            self._deliver(out.req_id, out)


def _resolve(future: asyncio.Future, value) -> None:
    """Complete a caller's future from the engine thread (an exception value is raised there)."""
    def done() -> None:
        if not future.done():
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)
    try:
        future.get_loop().call_soon_threadsafe(done)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting
        pass


def compute_load(engine: LLMEngine) -> WorkerLoad:
    """What the engine is busy with. Queued prefill tokens: the known tokens not yet computed of
    every waiting or running request, except a decoding request's one newest token."""
    sched, bm = engine.scheduler, engine.block_manager
    queued = 0
    for req in (*sched.waiting, *sched.running):
        pending = req.num_tokens - req.num_computed_tokens
        if req.status == RequestStatus.RUNNING and pending == 1 and req.num_output_tokens:
            pending = 0
        queued += max(pending, 0)
    stats, conn = engine.connector.stats, engine.connector
    entries = {"device": len(bm.cached_blocks)}
    if conn.store is not None:
        entries.update((t.name, len(t)) for t in conn.store.tiers)
    return WorkerLoad(num_running=len(sched.running), num_waiting=len(sched.waiting),
                      num_queued_prefill_tokens=queued,
                      num_kv_blocks_used=bm.num_blocks - bm.num_free_blocks, num_kv_blocks_total=bm.num_blocks,
                      prefix_query_tokens=stats.query_tokens, prefix_hit_tokens=dict(stats.hit_tokens),
                      kv_entries=entries)
