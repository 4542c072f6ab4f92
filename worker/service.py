"""The worker's gRPC service (`kvweave.v1.Worker`) over an `AsyncEngine`, for grpc.aio.

Token ids in (with the (start, length) spans of the prompt's reusable chunks, validated by the
engine), token deltas out. Protobuf stops here: requests become `SamplingParams` and
token-id lists, `RequestOutput`s become `WorkerGenerateResponse`s.

Disaggregation: `prefill_only` runs the prompt and its first token, then (unless that token ends
the request) answers one last response with the `kv_handoff` handle, stamped with this worker's
address and id, and no tokens; `kv_handoff` continues a request prefilled elsewhere from the
handle's first token (worker/kv_handoff.py). A malformed handle is INVALID_ARGUMENT.

Cache namespaces: the request's `cache_namespace` goes to the engine unchanged, which salts the
block-hash chain with `encode_extra_keys((engine.model_name, cache_namespace))`. A router that
computes `kvstore.keys.hash_blocks(token_ids, block_size, encode_extra_keys((model_name,
tenant)))` (with the `model` and `block_size` of the worker's registry entry) therefore gets
exactly the hashes this worker publishes to the KV index.

Errors: invalid input (InvalidRequestError and any other ValueError from validation) ends the
call with INVALID_ARGUMENT and the message; a request that failed alone inside the engine (finish
reason "error": its sampling or output processing, worker/sampling.py) with INTERNAL and its short
reason; anything else with INTERNAL and a fixed message (details only in the log: no exception
text, shapes or paths reach the client). A client that cancels its stream aborts the request.

Encode workers (role encode) answer `Encode`: the embeddings of the call's images, made sure to
be held here (cached, else encoded: worker/embedding_stage.py), stored in the host tier and
published to the KV index before the answer; they refuse `Generate` with FAILED_PRECONDITION.

Admission: a call that arrives while `max_waiting` calls already wait for their first output ends
at once with RESOURCE_EXHAUSTED (the router tries another worker), so a worker's queue, and its
memory, stay bounded under overload.

Metrics (worker/metrics.py): every call is counted by its final status (the finish reason, abort
also when its client cancelled, invalid, error), with its tokens and latencies from its arrival here.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace

import grpc

from kvweave.registry import WorkerLoad
from kvweave.defaults import WAITING_HEARTBEAT_S
from kvweave.convert import finish_reason_to_proto, sampling_from_proto, stop_reason_to_proto
from kvweave.errors import InvalidRequestError
from kvweave.limits import check_id
from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.async_engine import AsyncEngine
from worker.kv_handoff import Handoff
from worker.metrics import WorkerMetrics
from worker.output import RequestOutput

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
_MAX_ERROR_CHARS = 300


def load_to_proto(load: WorkerLoad) -> worker_pb2.Load:
    return worker_pb2.Load(
        num_running=load.num_running, num_waiting=load.num_waiting,
        num_queued_prefill_tokens=load.num_queued_prefill_tokens,
        num_kv_blocks_used=load.num_kv_blocks_used, num_kv_blocks_total=load.num_kv_blocks_total,
        prefix_query_tokens=load.prefix_query_tokens, prefix_hit_tokens=load.prefix_hit_tokens,
        kv_entries=load.kv_entries)


def load_from_proto(msg: worker_pb2.Load) -> WorkerLoad:
    return WorkerLoad(msg.num_running, msg.num_waiting, msg.num_queued_prefill_tokens,
                      msg.num_kv_blocks_used, msg.num_kv_blocks_total, msg.prefix_query_tokens,
                      dict(msg.prefix_hit_tokens), dict(msg.kv_entries))


def logprobs_to_proto(token_ids: list[int], logprobs: list[tuple[float, dict[int, float]]]
                      ) -> list[common_pb2.TokenLogprob]:
    return [common_pb2.TokenLogprob(token_id=tok, logprob=lp, top_logprobs=top)
            for tok, (lp, top) in zip(token_ids, logprobs)]


def handoff_to_proto(h: Handoff) -> worker_pb2.KVHandoff:
    msg = worker_pb2.KVHandoff(handoff_id=h.handoff_id, source_address=h.source_address,
                               source_worker_id=h.source_worker_id, block_keys=h.block_keys, num_tokens=h.num_tokens,
                               block_size=h.block_size, first_token_id=h.first_token_id,
                               sampler_state=h.sampler_state, ttl_s=h.ttl_s, complete=h.complete)
    if h.first_logprob is not None:
        lp, top = h.first_logprob
        msg.first_logprob.CopyFrom(common_pb2.TokenLogprob(token_id=h.first_token_id, logprob=lp, top_logprobs=top))
    return msg


def handoff_from_proto(msg: worker_pb2.KVHandoff) -> Handoff:
    logprob = (msg.first_logprob.logprob, dict(msg.first_logprob.top_logprobs)) if msg.HasField("first_logprob") \
        else None
    return Handoff(msg.handoff_id, tuple(msg.block_keys), msg.num_tokens, msg.block_size, msg.first_token_id,
                   logprob, bytes(msg.sampler_state), msg.ttl_s, msg.source_address, msg.source_worker_id,
                   msg.complete)


def holders_from_proto(msgs: Iterable[worker_pb2.EmbeddingHolder]) -> list[tuple[str, str]]:
    """The router's `embedding_holders`: (worker id, address) per image; InvalidRequestError when
    one is not an id-like string."""
    return [(check_id("embedding_holders.worker_id", h.worker_id), check_id("embedding_holders.address", h.address))
            for h in msgs]


def output_to_proto(out: RequestOutput, source: tuple[str, str] = ("", "")) -> worker_pb2.WorkerGenerateResponse:
    """One streamed delta; the finishing one also carries the finish reason and the usage. A handed-off
    prefill's last response carries the handle instead of tokens, stamped with `source`: this
    worker's (address, id)."""
    if out.handoff is not None:
        handoff = handoff_to_proto(replace(out.handoff, source_address=source[0], source_worker_id=source[1]))
        if not out.finished:  # the early handle
            return worker_pb2.WorkerGenerateResponse(kv_handoff=handoff)
        return worker_pb2.WorkerGenerateResponse(finished=True, kv_handoff=handoff, usage=_usage(out))
    msg = worker_pb2.WorkerGenerateResponse(token_ids=out.new_token_ids, text=out.new_text)
    if out.logprobs is not None and out.new_token_ids:
        start = len(out.token_ids) - len(out.new_token_ids)
        msg.logprobs.extend(logprobs_to_proto(out.new_token_ids, out.logprobs[start:]))
    if out.finished:
        msg.finished = True
        msg.finish_reason = finish_reason_to_proto(out.finish_reason)
        msg.stop_reason = stop_reason_to_proto(out.stop_reason)
        msg.usage.CopyFrom(_usage(out))
    return msg


HEARTBEAT = worker_pb2.WorkerGenerateResponse()
"""The empty response: the request is alive and waits for its first output (worker.proto)."""


async def with_heartbeats(stream: AsyncIterator, interval_s: float) -> AsyncIterator:
    """`stream`'s items, and None every `interval_s` while the first one is awaited."""
    it = stream.__aiter__()
    first = asyncio.ensure_future(it.__anext__())
    try:
        while not (await asyncio.wait({first}, timeout=interval_s))[0]:
            yield None
    finally:
        if not first.done():  # the caller went away while waiting: stop the read before closing
            first.cancel()
            await asyncio.wait({first})
    try:
        item = first.result()
    except StopAsyncIteration:
        return
    yield item
    async for item in it:
        yield item


def _usage(out: RequestOutput) -> common_pb2.Usage:
    images = out.image_sources or {}
    return common_pb2.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=len(out.token_ids),
                            cached_tokens=out.num_cached_tokens, chunk_reused_tokens=out.num_chunk_reused_tokens,
                            recomputed_tokens=out.num_recomputed_tokens, images_cached=images.get("cached", 0),
                            images_fetched=images.get("fetched", 0), images_encoded=images.get("encoded", 0))


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """`kvweave.v1.Worker` over one AsyncEngine."""

    def __init__(self, engine: AsyncEngine, worker_id: str, metrics: WorkerMetrics | None = None,
                 address: str = "", max_waiting: int = 0, role: str = "colocated",
                 publish: Callable[[], Awaitable[None]] | None = None) -> None:
        """`metrics`: where calls are counted (default: a registry of its own); `address`: this
        worker's advertised gRPC address (named in the handoffs it makes); `max_waiting`: calls
        waiting for their first output beyond which new ones are refused (0: no limit); `role`: an
        encode worker serves `Encode` and refuses `Generate`; `publish`: writes the pending KV
        events to the index (an `Encode` call answers after it)."""
        self.engine = engine
        self.role, self.publish = role, publish
        self.worker_id = worker_id
        self.address = address
        self.metrics = metrics or WorkerMetrics()
        self.max_waiting = max_waiting
        self.heartbeat_s = WAITING_HEARTBEAT_S
        """Interval of the empty responses sent while a call waits for its first output."""
        self.num_waiting = 0
        """Calls admitted that have not streamed an output yet."""
        self.num_encoding = 0
        """Images that this worker's Encode calls in flight are encoding."""

    def load(self) -> WorkerLoad:
        """What the heartbeat and GetLoad report: the engine's load; an encode worker's `num_waiting`
        is the images it is encoding (the routers pick the encoder with the fewest)."""
        load = self.engine.get_load()
        return replace(load, num_waiting=self.num_encoding) if self.role == "encode" else load

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext):
        if self.role == "encode":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.worker_id} is an encode worker: "
                                "it encodes images (Encode) and serves no generate requests")
        chunk_spans = [(c.start, c.length) for c in request.chunks]
        measured = self.metrics.request(len(request.prompt_token_ids), sum(n for _, n in chunk_spans))
        if self.max_waiting and self.num_waiting >= self.max_waiting:
            measured.finish("overloaded")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker overloaded: {self.num_waiting} "
                                f"requests wait for their first token (limit {self.max_waiting}); retry elsewhere")
        req_id = request.request_id or f"anon-{uuid.uuid4().hex}"
        code, message, started = None, "", False
        status = "abort"  # unless it finishes: the client went away first
        self.num_waiting += 1
        try:
            check_id("request_id", request.request_id)
            check_id("cache_namespace", request.cache_namespace)
            params = sampling_from_proto(request.sampling if request.HasField("sampling") else None)
            handoff = handoff_from_proto(request.kv_handoff) if request.HasField("kv_handoff") else None
            stream = self.engine.generate(list(request.prompt_token_ids), params, req_id, request.cache_namespace,
                                          chunk_spans, prefill_only=request.prefill_only, handoff=handoff,
                                          images=list(request.images),
                                          embedding_holders=holders_from_proto(request.embedding_holders))
            async with contextlib.aclosing(stream):
                async for out in with_heartbeats(stream, self.heartbeat_s):
                    if out is None:  # still waiting for the first output
                        yield HEARTBEAT
                        continue
                    if out.error is not None:  # this request alone failed in the engine
                        status, code, message = "error", grpc.StatusCode.INTERNAL, f"the request failed: {out.error}"
                        break
                    if not started:
                        started = True
                        self.num_waiting -= 1
                    measured.output(out)
                    if out.finished:
                        status = out.finish_reason
                    yield output_to_proto(out, (self.address, self.worker_id))
        except Exception as e:
            # Validation (InvalidRequestError and the engine's other ValueErrors) happens before
            # the first output; any failure after it is the server's.
            if isinstance(e, InvalidRequestError) and not started:
                status, code, message = "invalid", grpc.StatusCode.INVALID_ARGUMENT, _short(e)
            elif isinstance(e, ValueError) and not started:  # a check deeper down: its text is not for clients
                logger.info("request %s refused: %s", req_id, e)
                status, code, message = "invalid", grpc.StatusCode.INVALID_ARGUMENT, "the request is invalid"
            else:
                logger.exception("request %s failed", req_id)
                status, code, message = "error", grpc.StatusCode.INTERNAL, "internal error in the worker (see its log)"
        finally:
            if not started:
                self.num_waiting -= 1
            measured.finish(status)
        if code is not None:
            await context.abort(code, message)

    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortResponse:
        return common_pb2.AbortResponse(found=self.engine.abort(request.request_id))

    async def PrefetchKV(self, request: worker_pb2.PrefetchKVRequest, context) -> worker_pb2.PrefetchKVResponse:
        prefetch = self.engine.prefetch
        if prefetch is None or not request.HasField("kv_handoff"):
            return worker_pb2.PrefetchKVResponse(started=False)
        started = prefetch.start_pull(handoff_from_proto(request.kv_handoff), request.first_block)
        return worker_pb2.PrefetchKVResponse(started=started)

    async def Encode(self, request: worker_pb2.EncodeRequest, context) -> worker_pb2.EncodeResponse:
        stager = self.engine.prefetch.embeddings if self.engine.prefetch is not None else None
        if stager is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker's model takes no images")
        images: list = []
        try:
            check_id("cache_namespace", request.cache_namespace)
            images = stager.check_images(list(request.images))
            self.num_encoding += len(images)
            _, sources = await stager.embed(images, stager.cache_extra(request.cache_namespace), "Encode",
                                            from_peers=False)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _short(e))
        except Exception:
            logger.exception("Encode failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the worker (see its log)")
        finally:
            self.num_encoding -= len(images)
        await self.engine.flush_kv_events()
        if self.publish is not None:
            await self.publish()
        return worker_pb2.EncodeResponse(sources=sources)

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context) -> worker_pb2.GetLoadResponse:
        return worker_pb2.GetLoadResponse(worker_id=self.worker_id, load=load_to_proto(self.load()))
