"""The control-plane router: tokenize, validate, place, forward, stream back.

Per request: tokenize with the model's tokenizer (as the engine's `encode_prompt` does), validate
(empty, over the context length, sampling parameters), hash the prompt's full blocks with the
workers' chain (`kvstore.keys`, salted with (model, tenant) exactly as the engine salts them),
look up in ONE Redis round trip which worker holds which leading blocks in which tier
(`KVIndex.leading_tiers`; only when the policy needs it), let the policy pick, and stream the
worker's deltas back (controlplane/forwarding.py: deadlines, stalls, a failure before the first
token retried on another worker, one after it migrated). Each stage's time is a histogram
(`kvweave_router_stage_seconds`).

Every decision's prediction (the chosen worker's predicted hits by tier, its cost and the
runner-up's, controlplane/explain.py) goes to the request's usage and is compared with what the
worker reports it reused; `explain` shows the decision for a prompt without sending it. Router
replicas over one Redis share their in-flight requests per worker (controlplane/replica_load.py).

Prefill/decode disaggregation, when the registry has prefill workers: the policy picks the decode
(or colocated) worker D among the workers that serve whole requests, and the same policy picks a
prefill worker P by its cache-aware cost; `controlplane.disagg.decide` says whether P prefills
(per request, priced with D's measured costs; the reason goes to the usage, a metric and the debug
log). Remote: P runs the prompt prefill-only; its early handle makes D start pulling the KV as P computes
it (`PrefetchKV`), and its last answer is the complete handle (or the whole answer, when the first
token ends the request), with which D continues, waiting only for the last blocks.
Images, with encode workers up: those no worker holds are encoded on one first
(controlplane/encode.py); the prefill or colocated worker then fetches their embeddings.
P failing before it answers sends the request to D colocated; D failing before its first token is
retried on another worker with the same handle (P holds the KV until released or its TTL).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import redis.asyncio

from controlplane.disagg import DisaggDecision, decide
from controlplane.encode import EncodeDispatcher
from controlplane.errors import (
    DeadlineExceededError, NoWorkerError, OverloadedError, UnknownModelError, WorkerFailedError, error_status,
)
from controlplane.explain import Explanation, explain, predict
from controlplane.forwarding import BREAKER_CODES, Forwarder, RoutedRequest, WorkerFailure
from controlplane.image_fetch import ImageFetchConfig, ImageFetcher, parse_domains
from controlplane.metrics import RouterMetrics
from controlplane.policies import RouteRequest, WorkerState, held_chunk_tokens, make_policy
from controlplane.replica_load import ReplicaLoad
from kvweave.registry import Registry
from controlplane.router_config import RouterConfig
from controlplane.router_types import Delta, GenerateInput, ModelCard, TokenLogprob, Usage
from controlplane.worker_pool import PREFILL_ROLES, PoolWorker, WorkerPool
from kvstore.index import KVIndex, local_run
from kvstore.keys import ExtraKeysCache, chunk_block_keys, chunk_hash, hash_blocks
from kvweave.cluster_secret import hash_salt
from kvweave.convert import sampling_to_proto
from kvweave.v1 import common_pb2, worker_pb2
from kvweave.errors import InvalidRequestError
from kvweave.limits import check_prompt_size
from kvweave.model_files import LoadedTokenizer, load_tokenizer
from kvweave.redis_pipe import connect_pipelined
from kvweave.sampling_params import SamplingParams
from kvweave.segments import encode_chat_documents, encode_segments, split_on_separator
from kvweave.vision_prompt import encode_chat_with_images, has_image_parts, message_images

logger = logging.getLogger(__name__)

_MAX_TOKEN_ID = 2**31 - 1

__all__ = ["Router", "RouterConfig", "GenerateInput", "Delta", "Usage", "TokenLogprob", "ModelCard",
           "InvalidRequestError", "DeadlineExceededError", "NoWorkerError", "OverloadedError", "UnknownModelError",
           "WorkerFailedError", "error_status"]


class Router:
    def __init__(self, config: RouterConfig, model: LoadedTokenizer | None = None) -> None:
        """`model`: an already loaded tokenizer (else loaded from config.model)."""
        self.config = config
        self.policy = make_policy(config.policy, **config.policy_config)
        self.model = model or load_tokenizer(config.model)
        self.tokenizer = self.model.tokenizer
        self.metrics = RouterMetrics()
        self.redis = redis.asyncio.Redis.from_url(config.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0)
        self.index_reads = connect_pipelined(config.redis_url, connect_timeout_s=2.0, timeout_s=2.0)
        self.kv_index = KVIndex(self.redis, pipelined=self.index_reads)
        self.pool = WorkerPool(Registry(self.redis, config.lease_s), self.model.name, config.refresh_s,
                               self.metrics.set_workers)
        self.pool.probe_s, self.pool.min_open_s = config.breaker_probe_s, config.breaker_min_open_s
        self.pool.on_breaker = self.metrics.count_breaker
        self.pool.on_degraded = self.metrics.count_degraded  # Redis faults, counted
        self.replicas = ReplicaLoad(self.redis, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                                    config.load_sync_s, max(config.lease_s, 2 * config.load_sync_s))
        self.forwarder = Forwarder(self.pool, self.metrics, config.max_attempts, config.max_migrations,
                                   config.stall_timeout_s, (config.divergence_ratio, config.divergence_min_tokens))
        self.model_names = frozenset({self.model.name, config.model})
        self._extra_cache = ExtraKeysCache(self.model.name, hash_salt())  # bounded LRU, keyed hashes
        self.image_fetcher = ImageFetcher(ImageFetchConfig(config.image_limits, config.image_url_timeout_s,
                                                           parse_domains(config.image_url_domains)))
        self.encoders = EncodeDispatcher(self.pool, self.kv_index, self.metrics, self._extra_cache)
        self._active: dict[str, RoutedRequest] = {}
        self._background: set[asyncio.Future] = set()
        """Calls nobody awaits (early KV pulls)."""

    async def start(self) -> None:
        """Read the registry once and start watching it."""
        await self.pool.start()
        self.replicas.start(self.pool.workers)

    async def stop(self) -> None:
        for req in list(self._active.values()):
            req.aborted = True  # ends its stream; not a worker failure to migrate from
            req.cancel()
        for task in list(self._background):
            task.cancel()
        await self.replicas.close()
        await self.image_fetcher.close()
        await self.pool.close()
        if self.index_reads is not None:
            await self.index_reads.close()
        await self.redis.aclose()

    @property
    def num_inflight(self) -> int:
        return len(self._active)

    def list_models(self) -> list[ModelCard]:
        workers = self.pool.eligible()
        max_len = max((w.info.max_model_len for w in workers), default=self.model.max_seq_len)
        return [ModelCard(self.model.name, max_len, len(workers))]

    @property
    def ready(self) -> bool:
        """Whether a worker can serve a whole request of the router's model now (a colocated or
        decode worker with a live lease and a closed circuit breaker): what /ready and the gRPC
        health of the empty service name report."""
        return bool(self.pool.eligible())

    def abort(self, req_id: str) -> bool:
        """Stop a request; its stream ends with finish_reason "abort". False if unknown."""
        req = self._active.get(req_id)
        if req is None:
            return False
        req.aborted = True
        req.cancel()
        return True

    async def generate(self, inp: GenerateInput) -> AsyncIterator[Delta]:
        """Stream a request's deltas. Raises InvalidRequestError, OverloadedError, NoWorkerError
        before the first delta, WorkerFailedError after it."""
        start, status = time.perf_counter(), "cancelled"
        try:
            if len(self._active) >= self.config.max_inflight:
                raise OverloadedError(f"the router has {len(self._active)} requests in flight (limit "
                                      f"{self.config.max_inflight}); retry later")
            req = self._prepare(await self.fetch_images(inp), start)
            self._active[req.req_id] = req
            self.metrics.in_flight.inc()
            try:
                async with contextlib.aclosing(self._dispatch(req)) as deltas:
                    async for delta in deltas:
                        if delta.finished:  # the consumer may stop iterating after the last delta
                            status = "ok"
                            self.metrics.e2e.observe(time.perf_counter() - start)
                        yield delta
            finally:
                self.metrics.in_flight.dec()
                del self._active[req.req_id]
        except Exception as e:
            status = error_status(e).label
            raise
        finally:
            self.metrics.requests.labels(status).inc()

    async def fetch_images(self, inp: GenerateInput) -> GenerateInput:
        """`inp` with its http(s) image URLs fetched (controlplane/image_fetch.py), where allowed."""
        if inp.messages is None or not self.config.allow_image_urls:
            return inp
        return replace(inp, messages=await self.image_fetcher.resolve(inp.messages))

    def encode(self, inp: GenerateInput) -> list[int]:
        """Token ids of the prompt, as the engine's encode_prompt makes them (see `encode_prompt`)."""
        return self.encode_prompt(inp)[0]

    def encode_prompt(self, inp: GenerateInput, add_special_tokens: bool = True, add_generation_prompt: bool = True
                      ) -> tuple[list[int], list[tuple[int, int]]]:
        ids, spans, _ = self.encode_prompt_images(inp, add_special_tokens, add_generation_prompt)
        return ids, spans

    def encode_prompt_images(self, inp: GenerateInput, add_special_tokens: bool = True,
                             add_generation_prompt: bool = True) -> tuple[list[int], list[tuple[int, int]], list]:
        """`encode_prompt`'s (token ids, chunk spans) and the prompt's images (`ImageInput`s): chat
        content parts of type `image_url` (base64 data URLs) become the image's tokens, their
        `<image>` positions holding placeholder ids from its content hash (kvweave/vision_prompt.py),
        exactly as the worker makes them, so block hashes and the index tell images apart."""
        if inp.messages is not None and has_image_parts(inp.messages):
            vision = self.model.vision
            if vision is None:
                raise InvalidRequestError(f"model {self.model.name} does not take images (it is a text-only model)",
                                          "messages")
            check_prompt_size(self.list_models()[0].max_model_len, messages=inp.messages)
            messages, images = message_images(inp.messages, self.config.image_limits)
            return encode_chat_with_images(self.tokenizer, vision, messages, images, add_generation_prompt), [], images
        return (*self._encode_text(inp, add_special_tokens, add_generation_prompt), [])

    def _encode_text(self, inp: GenerateInput, add_special_tokens: bool, add_generation_prompt: bool
                     ) -> tuple[list[int], list[tuple[int, int]]]:
        """(token ids, reusable chunk spans) of the prompt: chat messages (documents become chunks),
        segments (reusable ones become chunks, kvweave/segments.py), a text (split at
        `config.chunk_separator` when it holds one) or token ids (no chunks). Generation uses the
        defaults; /tokenize may ask for a text without special tokens or a chat without the
        generation prompt."""
        given = [name for name in ("prompt", "messages", "segments") if getattr(inp, name) is not None]
        if len(given) > 1:
            raise InvalidRequestError(f"give one prompt form, not {' and '.join(given)}")
        check_prompt_size(self.list_models()[0].max_model_len, inp.prompt, inp.messages, inp.segments)
        if inp.messages is not None:
            return encode_chat_documents(self.tokenizer, inp.messages, add_generation_prompt)
        if inp.segments is not None:
            return encode_segments(self.tokenizer, inp.segments, add_special_tokens)
        prompt = inp.prompt
        if isinstance(prompt, str):
            sep = self.config.chunk_separator
            if sep and sep in prompt:
                return encode_segments(self.tokenizer, split_on_separator(prompt, sep), add_special_tokens)
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), []
        if isinstance(prompt, list) and all(type(t) is int and 0 <= t <= _MAX_TOKEN_ID for t in prompt):
            return prompt, []
        raise InvalidRequestError("prompt must be a string or a list of non-negative token ids")

    def _check_chunks(self, spans: list[tuple[int, int]], max_len: int) -> None:
        limit = self.config.max_chunks_per_request
        if len(spans) > limit:
            raise InvalidRequestError(f"the request has {len(spans)} reusable chunks; at most {limit} are allowed")
        for i, (_, n) in enumerate(spans):
            if n > max_len:
                raise InvalidRequestError(f"reusable chunk {i} has {n} tokens, more than the context length {max_len}")

    # -------------------------------------------------------------------------------- phases

    def check_model(self, model: str) -> None:
        """UnknownModelError unless `model` is empty (the router's) or a name of the router's model."""
        if model and model not in self.model_names:
            raise UnknownModelError(f"model {model!r} is not served here; available: {self.model.name}")

    def _prepare(self, inp: GenerateInput, arrival: float) -> RoutedRequest:
        self.check_model(inp.model)
        t0 = time.perf_counter()
        token_ids, spans, images = self.encode_prompt_images(inp)
        self.metrics.stages["tokenize"].observe(time.perf_counter() - t0)
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        max_len = self.list_models()[0].max_model_len
        self._check_chunks(spans, max_len)
        if len(token_ids) >= max_len:
            raise InvalidRequestError(f"prompt has {len(token_ids)} tokens, but the context length is {max_len} "
                                      "(at least one token must be generated)")
        params = inp.params or SamplingParams()
        if inp.auto_max_tokens:
            params = replace(params, max_tokens=max_len - len(token_ids))
        params.validate()
        req_id = inp.req_id or f"rtr-{uuid.uuid4().hex}"
        if req_id in self._active:
            raise InvalidRequestError(f"request id {req_id!r} is already in use")
        message = worker_pb2.WorkerGenerateRequest(request_id=req_id, prompt_token_ids=token_ids,
                                                   sampling=sampling_to_proto(params), cache_namespace=inp.tenant,
                                                   chunks=[common_pb2.ChunkSpan(start=a, length=n) for a, n in spans],
                                                   images=[img.data for img in images])
        deadline = time.monotonic() + (inp.timeout_s if inp.timeout_s is not None else self.config.request_timeout_s)
        return RoutedRequest(req_id, token_ids, inp.session_id, inp.tenant, params, message, arrival, deadline,
                             chunk_spans=spans, images=images)

    def _candidates(self, req: RoutedRequest) -> list[PoolWorker]:
        workers = [w for w in self.pool.eligible() if w.info.max_model_len > len(req.token_ids)]
        if not workers:
            raise NoWorkerError(f"no worker serving {self.model.name} is available")
        return workers

    async def explain(self, inp: GenerateInput) -> Explanation:
        """The placement `generate` would choose for `inp` now, with every candidate, without sending
        it (`POST /v1/route/explain`). The policy decides on a copy of itself, so its tie rotation and
        session memory stay as they were. Raises as `generate` does before its first delta."""
        req = self._prepare(await self.fetch_images(inp), time.perf_counter())
        workers = self._candidates(req)
        hits = await self._lookup(req, workers)
        states = [self._state(w, hits) for w in workers]
        request = self._route_request(req)
        return explain(request, states, copy.deepcopy(self.policy).pick(request, states))

    async def _dispatch(self, req: RoutedRequest) -> AsyncIterator[Delta]:
        workers = self._candidates(req)
        await self.encoders.ensure(req)
        prefills = [w for w in self.pool.eligible(roles=PREFILL_ROLES) if w.info.max_model_len > len(req.token_ids)]
        t0 = time.perf_counter()
        hits = await self._lookup(req, workers + prefills)
        worker, num_hit_blocks = self._pick(req, workers, hits)
        self.metrics.stages["decision"].observe(time.perf_counter() - t0)
        if self._disaggregated(prefills):
            async for delta in self._remote_prefill(req, worker, prefills, hits):
                yield delta  # the first token ended the request on the prefill worker
                return
        pick = functools.partial(self._pick, hits=hits)
        async with contextlib.aclosing(self.forwarder.forward(req, (worker, num_hit_blocks), pick)) as deltas:
            async for delta in deltas:
                yield delta

    async def _lookup(self, req: RoutedRequest, workers: list[PoolWorker]) -> dict[str, tuple[bytes, bytes]]:
        """Per worker, (the tier of each leading block of the prompt, where it gets each reusable
        chunk): the codes of `KVIndex.route_tiers`, one Redis round trip (per block size)."""
        if not self.policy.needs_index:
            return {}
        t0 = time.perf_counter()
        extra = self._extra_cache.get(req.tenant)
        by_size: dict[int, list[str]] = {}
        for w in workers:
            by_size.setdefault(w.info.block_size, []).append(w.worker_id)
        chains = {size: hash_blocks(req.token_ids, size, extra) for size in by_size}
        req.block_hashes = chains[workers[0].info.block_size]
        chunks = [req.token_ids[a:a + n] for a, n in req.chunk_spans]
        chunk_keys = [(chunk_hash(c, extra), len(c)) for c in chunks]
        t1 = time.perf_counter()
        self.metrics.stages["hash"].observe(t1 - t0)
        tiers = self._worker_tiers(workers)
        try:
            if chunks:
                lookups = [self.kv_index.route_tiers(chains[size], {w: tiers[w] for w in ids},
                                                     [chunk_block_keys(k, n, size) for k, n in chunk_keys])
                           for size, ids in by_size.items()]
            else:  # the prefix-only lookup (what `kvweave bench router` replays without Redis)
                lookups = [self.kv_index.leading_tiers(chains[size], {w: tiers[w] for w in ids})
                           for size, ids in by_size.items()]
            found = [await lookups[0]] if len(lookups) == 1 else await asyncio.gather(*lookups)
        except (redis.RedisError, OSError) as e:
            logger.warning("KV index lookup failed, routing without cache hits: %s", e)
            self.metrics.count_degraded("index_lookup")
            return {}
        self.metrics.stages["index_lookup"].observe(time.perf_counter() - t1)
        if not chunks:
            return {k: (v, b"") for hits in found for k, v in hits.items()}
        return {k: (v, chunk_codes[k]) for prefix, chunk_codes in found for k, v in prefix.items()}

    def _disaggregated(self, prefills: list[PoolWorker]) -> bool:
        """Whether this cluster splits prefill from decode (it has, or had, prefill or decode workers)."""
        return bool(prefills) or any(w.info.role in ("prefill", "decode") for w in self.pool.workers.values())

    def _decide(self, req: RoutedRequest, decode: PoolWorker, prefills: list[PoolWorker],
                hits: dict[str, tuple[bytes, bytes]]) -> tuple[DisaggDecision, PoolWorker | None]:
        """Remote prefill or not, and on which prefill worker (the policy's pick among them)."""
        state = self._state(decode, hits)
        request = self._route_request(req)
        hit_tokens = state.num_hit_blocks * decode.info.block_size
        uncached = max(0, len(req.token_ids) - hit_tokens - held_chunk_tokens(request, state))
        prefill = None
        if prefills:
            choice = self.policy.pick(request, [self._state(w, hits) for w in prefills])
            prefill = next(w for w in prefills if w.worker_id == choice.worker_id)
        decision = decide(self.config.disagg, state, self._state(prefill, hits) if prefill else None, uncached,
                          len(req.token_ids) - hit_tokens, decode.info.max_num_batched_tokens)
        return decision, prefill

    async def _remote_prefill(self, req: RoutedRequest, decode: PoolWorker, prefills: list[PoolWorker],
                              hits: dict[str, tuple[bytes, bytes]]) -> AsyncIterator[Delta]:
        """Decide, and when remote, run the prefill: afterwards `req.message` carries the handoff
        for the decode worker; yields the whole answer when the first token ended the request."""
        decision, prefill = self._decide(req, decode, prefills, hits)
        req.disaggregation = decision.reason
        self.metrics.disagg_decisions.labels(decision.reason).inc()
        logger.debug("disaggregation %s: %s (uncached %d tokens, handoff %.1f ms vs local prefill %.1f ms) "
                     "decode %s prefill %s", req.req_id, decision.reason, decision.uncached_tokens,
                     decision.handoff_ms, decision.local_prefill_ms, decode.worker_id,
                     prefill.worker_id if prefill else None)
        if not decision.remote or req.aborted:
            return
        t0 = time.perf_counter()
        message = worker_pb2.WorkerGenerateRequest()
        message.CopyFrom(req.message)
        message.prefill_only = True
        num_prefill = max(0, len(req.token_ids) - local_run(hits.get(prefill.worker_id, (b"", b""))[0])
                          * prefill.info.block_size)
        req.check_deadline()
        prefill.num_local_waiting += 1
        prefill.num_local_prefill_tokens += num_prefill
        req.call = prefill.stub.Generate(message, timeout=req.remaining_s())
        last = None
        try:
            while (resp := await self.forwarder.read(req, prefill)) is not grpc.aio.EOF:
                last = resp
                if resp.HasField("kv_handoff") and not resp.finished:  # the early handle: D pulls as P computes
                    first_block = local_run(hits.get(decode.worker_id, (b"", b""))[0])
                    self._prefetch_kv(req, decode, resp.kv_handoff, first_block)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(e.details() or code.name) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceededError(f"request {req.req_id} ran past its deadline") from None
            if code in BREAKER_CODES:
                self.pool.open_breaker(prefill.worker_id, f"{code.name}: {e.details()}")
            if req.aborted:
                yield Delta(req.req_id, prefill.worker_id, "", [], True, "abort")
                return
            self._prefill_failed(req, prefill, f"{code.name}: {e.details()}")
            return
        except (WorkerFailure, asyncio.CancelledError) as e:  # stalled, or left the registry (channel closed)
            if req.aborted:
                yield Delta(req.req_id, prefill.worker_id, "", [], True, "abort")
                return
            if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
                raise  # the client went away
            self._prefill_failed(req, prefill, str(e) or "it left the registry")
            return
        finally:
            prefill.num_local_waiting -= 1
            prefill.num_local_prefill_tokens -= num_prefill
            req.cancel()
            req.call = None
        self.metrics.remote_prefill.observe(time.perf_counter() - t0)
        if last is None or not last.finished:
            self._prefill_failed(req, prefill, "its answer ended early")
            return
        req.prefill_worker_id = prefill.worker_id
        if last.HasField("kv_handoff"):
            self.metrics.handoffs.labels("handed_off").inc()
            req.prefill_usage = last.usage
            req.message.kv_handoff.CopyFrom(last.kv_handoff)
            return
        self.metrics.handoffs.labels("finished_on_prefill").inc()
        self.metrics.ttft.observe(time.perf_counter() - req.arrival)
        req.started = True
        yield self.forwarder.delta(req, prefill, last)

    def _prefetch_kv(self, req: RoutedRequest, decode: PoolWorker, handoff: worker_pb2.KVHandoff,
                     first_block: int) -> None:
        """Ask the decode worker to start pulling a prefill's KV now (answered at once; a failure
        only means it pulls when the request arrives)."""
        call = decode.stub.PrefetchKV(worker_pb2.PrefetchKVRequest(kv_handoff=handoff, first_block=first_block),
                                      timeout=max(0.001, min(self.config.lease_s, req.remaining_s())))
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("early KV pull not started: %s", task.exception())

    def _prefill_failed(self, req: RoutedRequest, prefill: PoolWorker, why: str) -> None:
        logger.warning("request %s: prefill worker %s failed before answering (%s); prefilling on the decode "
                       "worker instead", req.req_id, prefill.worker_id, why)
        self.metrics.handoffs.labels("prefill_failed").inc()
        req.disaggregation = "prefill_failed"

    def _worker_tiers(self, workers: list[PoolWorker]) -> dict[str, tuple[str, ...]]:
        """The index tiers worth asking about per worker: the device, and the configured host tiers
        its heartbeat says hold something."""
        out = {}
        for w in workers:
            held = w.info.load.kv_entries
            out[w.worker_id] = tuple(m for m in self.config.index_mediums if m == "device" or held.get(m))
        return out

    @staticmethod
    def _state(w: PoolWorker, hits: dict[str, tuple[bytes, bytes]]) -> WorkerState:
        prefix, chunks = hits.get(w.worker_id, (b"", b""))
        state = w.state(prefix)
        state.chunk_tiers = chunks
        return state

    @staticmethod
    def _route_request(req: RoutedRequest) -> RouteRequest:
        return RouteRequest(len(req.token_ids), req.block_hashes, req.session_id, req.req_id, req.chunk_spans)

    def _pick(self, req: RoutedRequest, workers: list[PoolWorker],
              hits: dict[str, tuple[bytes, bytes]]) -> tuple[PoolWorker, int]:
        t0 = time.perf_counter()
        states = [self._state(w, hits) for w in workers]
        request = self._route_request(req)
        decision = self.policy.pick(request, states)
        self.metrics.stages["scoring"].observe(time.perf_counter() - t0)
        logger.debug("route %s -> %s (%s, %s) costs=%s hits=%s", req.req_id, decision.worker_id, decision.policy,
                     decision.reason, decision.costs, hits)
        self.metrics.decisions.labels(decision.policy, decision.worker_id).inc()
        self.metrics.track_route_worker(decision.worker_id)
        req.route = predict(request, states, decision)
        i = next(i for i, w in enumerate(workers) if w.worker_id == decision.worker_id)
        if req.chunk_spans:
            self.metrics.predicted_chunk_hit_tokens.inc(held_chunk_tokens(request, states[i]))
        return workers[i], states[i].num_hit_blocks
