"""Asyncio front of the engine: the engine steps in one background thread; callers stream.

All engine state is touched only by the engine thread. Callers tokenize and validate in their
own thread (`LLMEngine.make_request`, so bad input fails at once with InvalidRequestError), then
hand the request over through a queue; outputs come back to each caller's asyncio queue with
`call_soon_threadsafe`. A caller that stops listening (cancelled, or the stream closed) aborts
its request. A failure inside a step fails the requests in flight with an error and the loop
keeps serving new ones.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from worker.engine import LLMEngine, Prompt
from worker.output import RequestOutput
from worker.request import Request
from worker.sampling import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvweave-engine", daemon=True)
        self._thread.start()

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, req_id: str | None = None,
                       cache_namespace: str = "") -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each with the new delta); raises InvalidRequestError at once."""
        req = self.engine.make_request(prompt, params, req_id, cache_namespace)
        if req.req_id in self._streams:
            raise InvalidRequestError(f"request id {req.req_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[req.req_id] = stream
        self._commands.put(("add", req))
        finished = False
        try:
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

    def abort(self, req_id: str) -> None:
        self._commands.put(("abort", req_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)

    def _deliver(self, req_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(req_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _apply(self, cmd: str, arg) -> None:
        if cmd == "add":
            req: Request = arg
            try:
                self.engine.submit(req)
            except ValueError as e:
                self._deliver(req.req_id, e)
        elif cmd == "abort":
            out = self.engine.abort_request(arg)
            if out is not None:
                self._deliver(arg, out)

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

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug must not take the server down: fail what was in flight
            logger.exception("engine step failed; failing %d requests", len(self.engine.scheduler.requests))
            for req_id in list(self.engine.scheduler.requests):
                self.engine.abort_request(req_id)
                self._deliver(req_id, RuntimeError(f"engine step failed: {e}"))
            return
        for out in outputs:
            self._deliver(out.req_id, out)
