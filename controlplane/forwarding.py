"""Forwarding a placed request to workers: deadlines, stall detection, retry and mid-stream migration.

Every call to a worker carries the request's gRPC deadline (`RoutedRequest.deadline`: the caller's,
else `RouterConfig.request_timeout_s`); past it the request ends with `DeadlineExceededError` and
the worker's call is cancelled (the worker aborts the request and frees its blocks). A running
stream that sends nothing for `stall_timeout_s` is a stalled worker; while a request waits for its
first token (queued, or prefilling a long prompt) its worker sends an empty response every
`kvweave.defaults.WAITING_HEARTBEAT_S`, so waiting is not a stall. A worker that fails at the
connection level, stalls, or leaves the registry (the pool closes its channel, which cancels its
calls) gets its circuit breaker opened (controlplane/worker_pool.py).

Then, as Dynamo does: a request that has streamed nothing is retried on another worker (at most
`max_attempts` workers); a request that has streamed tokens is migrated: another worker continues
from the prompt plus the tokens already sent, with max_tokens and min_tokens reduced by them and
the same sampling parameters and chunks, so the client sees one stream (at most `max_migrations`
times). The usage keeps the original prompt_tokens and counts every completion token. Greedy output
is that of an unmigrated run; seeded sampling and stop strings that span the cut are best effort.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import grpc

from controlplane.errors import DeadlineExceededError, NoWorkerError, OverloadedError, WorkerFailedError
from controlplane.explain import RoutePrediction, check_delivery
from controlplane.metrics import RouterMetrics
from controlplane.router_types import Delta, TokenLogprob, Usage
from controlplane.worker_pool import PoolWorker, WorkerPool
from kvweave.convert import finish_reason_from_proto, sampling_to_proto
from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams
from kvweave.v1 import common_pb2, worker_pb2

HEARTBEAT = worker_pb2.WorkerGenerateResponse()
"""A worker's empty response while a request waits for its first token (worker.proto)."""

logger = logging.getLogger(__name__)

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                         grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""Codes after which another worker may serve the request."""
BREAKER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
"""Connection-level failures: open the worker's circuit breaker (it is probably gone)."""


@dataclass(slots=True)
class RoutedRequest:
    req_id: str
    token_ids: list[int]
    session_id: str
    tenant: str
    params: SamplingParams
    message: worker_pb2.WorkerGenerateRequest
    arrival: float
    """perf_counter() when the router got the request (TTFT counts from here)."""
    deadline: float
    """monotonic() time by which the request must end."""
    call: grpc.aio.UnaryStreamCall | None = None
    aborted: bool = False
    block_hashes: list = field(default_factory=list)
    """The prompt's block-hash chain (for the policy; empty when it does not use the index)."""
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)
    """(start, length) token spans of the prompt's reusable chunks (sorted, disjoint)."""
    disaggregation: str = ""
    """The prefill/decode decision's reason (empty: no prefill workers)."""
    prefill_worker_id: str = ""
    prefill_usage: common_pb2.Usage | None = None
    """The prefill worker's usage (its prefix and chunk reuse) of a handed-off request."""
    started: bool = False
    """Whether a delta has reached the client."""
    sent_token_ids: list[int] = field(default_factory=list)
    """Every token streamed to the client so far."""
    num_carried: int = 0
    """Of those, the tokens sent before the current worker (it got them as prompt)."""
    num_migrations: int = 0
    route: RoutePrediction | None = None
    """The policy's prediction for the worker it chose last (controlplane/explain.py)."""
    images: list = field(default_factory=list)
    """The prompt's images (`kvweave.images.ImageInput`), in prompt order."""

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def check_deadline(self) -> None:
        if self.remaining_s() <= 0:
            raise DeadlineExceededError(f"request {self.req_id} ran past its deadline")

    def cancel(self) -> None:
        if self.call is not None and not self.call.done():
            self.call.cancel()


_TRANSPORT_CODES = {grpc.StatusCode.UNAVAILABLE: "the worker cannot be reached",
                    grpc.StatusCode.UNKNOWN: "the worker failed",
                    grpc.StatusCode.CANCELLED: "the call was cancelled"}
"""Codes gRPC itself raises (its details name peer addresses and exception text), with what a client
is told instead; the details go to the log. The workers' own errors are written for clients."""


class WorkerFailure(Exception):
    """A worker failed, stalled or left: the request may continue on another one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


PickFn = Callable[[RoutedRequest, list[PoolWorker]], tuple[PoolWorker, int]]
"""(request, candidates) -> (the chosen worker, its number of prefix-hit blocks)."""


class Forwarder:
    def __init__(self, pool: WorkerPool, metrics: RouterMetrics, max_attempts: int, max_migrations: int,
                 stall_timeout_s: float, divergence: tuple[float, int] = (0.5, 32)) -> None:
        """`divergence`: (ratio, min_tokens) of `explain.check_delivery`."""
        self.pool = pool
        self.divergence = divergence
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.max_migrations = max_migrations
        self.stall_timeout_s = stall_timeout_s

    async def forward(self, req: RoutedRequest, first: tuple[PoolWorker, int], pick: PickFn) -> AsyncIterator[Delta]:
        """Stream the request from `first`, then from other workers (`pick`) on failures: retried
        before its first token, migrated after it."""
        failed: dict[str, WorkerFailure] = {}
        worker, num_hit_blocks = first
        while True:
            try:
                async with contextlib.aclosing(self.stream(req, worker, num_hit_blocks)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            except WorkerFailure as e:
                failed[worker.worker_id] = e
                logger.warning("request %s failed on worker %s after %d token(s): %s", req.req_id, worker.worker_id,
                               len(req.sent_token_ids), e)
            req.check_deadline()
            candidates = [w for w in self.pool.eligible() if w.worker_id not in failed
                          and w.info.max_model_len > len(req.token_ids) + len(req.sent_token_ids)]
            if req.started:
                if req.num_migrations >= self.max_migrations:
                    raise WorkerFailedError(f"request {req.req_id} failed mid-stream after {req.num_migrations} "
                                            f"migration(s) (the limit)")
                if not candidates:
                    raise WorkerFailedError(f"request {req.req_id} failed mid-stream and no other worker can "
                                            "continue it")
                self._migrate(req)
            else:
                if not candidates or len(failed) >= self.max_attempts:
                    raise self._no_worker(failed)
                self.metrics.retries.inc()
            worker, num_hit_blocks = pick(req, candidates)

    @staticmethod
    def _no_worker(failed: dict[str, WorkerFailure]) -> Exception:
        why = "; ".join(f"{k}: {v}" for k, v in failed.items())
        if all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in failed.values()):
            return OverloadedError(f"every worker tried has a full queue ({len(failed)}); retry later")
        return NoWorkerError(f"request failed on {len(failed)} worker(s) before its first token: {why}")

    def _migrate(self, req: RoutedRequest) -> None:
        """Make `req.message` continue the request: the prompt plus the tokens already sent."""
        n = len(req.sent_token_ids)
        params = replace(req.params, max_tokens=req.params.max_tokens - n,
                         min_tokens=max(0, req.params.min_tokens - n))
        message = worker_pb2.WorkerGenerateRequest()
        message.CopyFrom(req.message)
        del message.prompt_token_ids[:]
        message.prompt_token_ids.extend(req.token_ids + req.sent_token_ids)
        message.sampling.CopyFrom(sampling_to_proto(params))
        message.ClearField("kv_handoff")
        message.prefill_only = False
        req.message = message
        req.num_carried = n
        req.num_migrations += 1
        self.metrics.migrations.inc()
        logger.info("request %s: migrating after %d token(s) (migration %d)", req.req_id, n, req.num_migrations)

    async def stream(self, req: RoutedRequest, worker: PoolWorker, num_hit_blocks: int) -> AsyncIterator[Delta]:
        """Forward to one worker; raises WorkerFailure when it fails, stalls or leaves."""
        num_prefill = 0 if req.message.HasField("kv_handoff") else \
            max(0, len(req.message.prompt_token_ids) - num_hit_blocks * worker.info.block_size)
        if not req.num_migrations:
            self.metrics.predicted_hit_tokens.inc(len(req.token_ids) - num_prefill)
        if req.aborted:  # aborted while being placed
            yield Delta(req.req_id, worker.worker_id, "", [], True, "abort")
            return
        req.check_deadline()
        worker.num_local_waiting += 1
        worker.num_local_prefill_tokens += num_prefill
        started, finished, last = False, False, req.arrival if not req.started else time.perf_counter()
        req.call = worker.stub.Generate(req.message, timeout=req.remaining_s())
        try:
            while True:
                resp = await self.read(req, worker)
                if resp is grpc.aio.EOF:
                    break
                if resp == HEARTBEAT:  # still waiting for its first token: alive, not stalled
                    continue
                now = time.perf_counter()
                if not started:
                    started = True
                    worker.num_local_waiting -= 1
                    worker.num_local_prefill_tokens -= num_prefill
                    worker.num_local_running += 1
                    if not req.started:
                        self.metrics.ttft.observe(now - last)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                delta = self.delta(req, worker, resp)
                req.started = True
                req.sent_token_ids.extend(delta.token_ids)
                finished = delta.finished
                yield delta
                if finished:
                    return
        except grpc.aio.AioRpcError as e:
            if not req.aborted:
                self._on_rpc_error(e, req, worker)
            yield Delta(req.req_id, worker.worker_id, "", [], True, "abort")
            return
        except asyncio.CancelledError:
            if req.aborted:
                yield Delta(req.req_id, worker.worker_id, "", [], True, "abort")
                return
            if asyncio.current_task().cancelling():
                raise  # the client went away
            # Our own task was not cancelled: the pool closed the worker's channel (its lease lapsed).
            self.pool.open_breaker(worker.worker_id, "it left the registry with calls in flight")
            raise WorkerFailure("the worker left the registry") from None
        finally:
            if started:
                worker.num_local_running -= 1
            else:
                worker.num_local_waiting -= 1
                worker.num_local_prefill_tokens -= num_prefill
            if not finished:  # a finished call ends by itself: cancelling it would race its status
                req.cancel()
        raise WorkerFailure("its stream ended before the request finished")

    async def read(self, req: RoutedRequest, worker: PoolWorker):
        """The next response of `req.call` (or grpc.aio.EOF); WorkerFailure after `stall_timeout_s`
        without one (the worker's breaker opens), DeadlineExceededError past the deadline."""
        try:
            async with asyncio.timeout(min(self.stall_timeout_s, max(req.remaining_s(), 0.0) + 1.0)):
                return await req.call.read()
        except TimeoutError:
            req.check_deadline()
            self.pool.open_breaker(worker.worker_id, f"no response for {self.stall_timeout_s:g} s")
            raise WorkerFailure(f"no response for {self.stall_timeout_s:g} s (stalled)") from None

    def _on_rpc_error(self, e: grpc.aio.AioRpcError, req: RoutedRequest, worker: PoolWorker) -> None:
        code, details = e.code(), e.details() or e.code().name
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise DeadlineExceededError(f"request {req.req_id} ran past its deadline") from None
        if code == grpc.StatusCode.INVALID_ARGUMENT and not req.started:
            raise InvalidRequestError(details) from None
        if code in BREAKER_CODES:
            self.pool.open_breaker(worker.worker_id, f"{code.name}: {details}")
        if code in _TRANSPORT_CODES:  # gRPC's own text names addresses and exceptions: for the log only
            logger.info("request %s: worker %s: %s: %s", req.req_id, worker.worker_id, code.name, details)
            details = _TRANSPORT_CODES[code]
        if code not in RETRY_CODES:
            raise WorkerFailedError(f"worker {worker.worker_id} rejected the request ({code.name}: "
                                    f"{details})") from None
        raise WorkerFailure(f"{code.name}: {details}", code) from None

    def delta(self, req: RoutedRequest, worker: PoolWorker, resp: worker_pb2.WorkerGenerateResponse) -> Delta:
        delta = Delta(req.req_id, worker.worker_id, resp.text, list(resp.token_ids))
        if resp.logprobs:
            delta.logprobs = [TokenLogprob(lp.token_id, lp.logprob, dict(lp.top_logprobs)) for lp in resp.logprobs]
        if resp.finished:
            delta.finished = True
            delta.finish_reason = finish_reason_from_proto(resp.finish_reason)
            delta.stop_reason = resp.stop_reason
            u = resp.usage
            p = req.prefill_usage or u  # a handed-off prompt's reuse happened where it was prefilled
            # A migrated request's new worker may have had part of the tokens already sent cached:
            # only the original prompt counts as prompt.
            num_prompt = u.prompt_tokens - req.num_carried
            delta.usage = Usage(num_prompt, u.completion_tokens + req.num_carried, min(p.cached_tokens, num_prompt),
                                p.chunk_reused_tokens, p.recomputed_tokens, req.disaggregation, req.prefill_worker_id,
                                req.num_migrations, images_cached=p.images_cached, images_fetched=p.images_fetched,
                                images_encoded=p.images_encoded)
            if req.num_migrations:
                logger.info("request %s finished after %d migration(s)", req.req_id, req.num_migrations)
            self._check_route(req, worker, delta.usage)
            self.metrics.count_usage(delta.usage)
        return delta

    def _check_route(self, req: RoutedRequest, worker: PoolWorker, usage: Usage) -> None:
        """Attach the router's prediction to the usage and, when the worker it was made for prefilled
        the whole prompt, compare it with what that worker reused (counted per worker)."""
        route = usage.route = req.route
        if route is None or route.worker_id != worker.worker_id or req.num_migrations or req.prefill_usage:
            return
        delivered = usage.cached_tokens + usage.chunk_reused_tokens
        usage.route_divergence = check_delivery(route, delivered, *self.divergence)
        self.metrics.count_route_check(worker.worker_id, route.held_tokens, delivered, usage.route_divergence)
        if usage.route_divergence:
            logger.info("request %s on worker %s: reused %d prompt tokens, the router predicted %d held (+%d from "
                        "peers): %s", req.req_id, worker.worker_id, delivered, route.held_tokens, route.peer_tokens,
                        "a stale index" if usage.route_divergence == "under" else "KV events missing")
