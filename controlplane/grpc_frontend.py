"""The router's gRPC face: `kvweave.v1.Inference` (Generate, Abort, ListModels, Explain), grpc.health.v1 and
server reflection. Protobuf stops here: requests become `GenerateInput`, `Delta`s become
`GenerateResponse`s. Errors end the call with the status of `controlplane.errors.error_status` and
a message, never a traceback.

With API keys (controlplane/auth.py) the Inference methods need `authorization: Bearer KEY`
metadata (UNAUTHENTICATED), a request's `tenant` must be empty or the key's (PERMISSION_DENIED),
its cache namespace is the key's, the key's rate limits apply to Generate (RESOURCE_EXHAUSTED with
`retry-after` trailing metadata, in seconds) and Explain, and Abort finds only the caller's own requests.
Health and reflection stay open.

Health (`RouterHealth`): the service `kvweave.v1.Inference` answers SERVING while the process serves
(liveness); the empty service name, the server as a whole and what a Kubernetes `grpc:` probe asks
by default, answers SERVING only while a worker serves the router's model and NOT_SERVING before
(readiness, as GET /ready), re-checked every registry refresh.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.auth import Gate, Tenant
from controlplane.errors import RateLimitedError, RouterError, error_status, public_message
from controlplane.explain import Explanation, RoutePrediction
from controlplane.router import Delta, GenerateInput, Router
from kvweave.convert import finish_reason_to_proto, sampling_from_proto
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from kvweave.errors import InvalidRequestError
from kvweave.grpc_decode import DecodeErrorInterceptor
from kvweave.limits import check_id

logger = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


def _message_from_proto(m: common_pb2.ChatMessage, i: int) -> dict:
    """A chat message as the router takes it; content parts become text and image parts."""
    if not m.parts:
        return {"role": m.role, "content": m.content} | ({"kvweave": {"document": True}} if m.document else {})
    if m.content or m.document:
        raise InvalidRequestError(f"messages[{i}]: give its content or its parts, not both (parts cannot be a "
                                  "document)")
    return {"role": m.role, "content": [{"type": "text", "text": p.text} if p.WhichOneof("part") == "text"
                                        else {"type": "image", "data": p.image} for p in m.parts]}


def input_from_proto(msg: inference_pb2.GenerateRequest) -> GenerateInput:
    """Raises InvalidRequestError for a missing prompt, invalid sampling parameters or an over-long id."""
    for name in ("model", "request_id", "session_id", "tenant"):
        check_id(name, getattr(msg, name))
    kind = msg.WhichOneof("prompt")
    inp = GenerateInput(model=msg.model, req_id=msg.request_id, session_id=msg.session_id, tenant=msg.tenant)
    if kind == "text":
        inp.prompt = msg.text
    elif kind == "token_ids":
        inp.prompt = list(msg.token_ids.ids)
    elif kind == "chat":
        inp.messages = [_message_from_proto(m, i) for i, m in enumerate(msg.chat.messages)]
    elif kind == "segments":
        inp.segments = [(s.text, s.reusable) for s in msg.segments.segments]
    else:
        raise InvalidRequestError("the request has no prompt (text, chat, token_ids or segments)")
    inp.params = sampling_from_proto(msg.sampling if msg.HasField("sampling") else None)
    inp.auto_max_tokens = kind == "chat" and not msg.sampling.HasField("max_tokens")
    return inp


def delta_to_proto(delta: Delta) -> inference_pb2.GenerateResponse:
    msg = inference_pb2.GenerateResponse(request_id=delta.req_id, text=delta.text, token_ids=delta.token_ids,
                                         worker_id=delta.worker_id)
    if delta.logprobs:
        msg.logprobs.extend(common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                                    top_logprobs=lp.top_logprobs) for lp in delta.logprobs)
    if delta.finished:
        msg.finished = True
        msg.finish_reason = finish_reason_to_proto(delta.finish_reason)
        msg.stop_reason = delta.stop_reason
        if delta.usage is not None:
            u = delta.usage
            msg.usage.CopyFrom(common_pb2.Usage(
                prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens,
                chunk_reused_tokens=u.chunk_reused_tokens, recomputed_tokens=u.recomputed_tokens,
                disaggregation=u.disaggregation, prefill_worker_id=u.prefill_worker_id, images_cached=u.images_cached,
                images_fetched=u.images_fetched, images_encoded=u.images_encoded))
            if u.route is not None:
                msg.usage.route.CopyFrom(route_to_proto(u.route, u.route_divergence))
    return msg


def route_to_proto(p: RoutePrediction, divergence: str = "") -> common_pb2.RoutePrediction:
    msg = common_pb2.RoutePrediction(worker_id=p.worker_id, policy=p.policy, reason=p.reason,
                                     prefix_tokens=common_pb2.TierTokens(**p.prefix_tokens),
                                     chunk_tokens=common_pb2.TierTokens(**p.chunk_tokens),
                                     runner_up_worker_id=p.runner_up_id, divergence=divergence)
    if p.cost is not None:
        msg.cost = p.cost
    if p.runner_up_cost is not None:
        msg.runner_up_cost = p.runner_up_cost
    return msg


def explanation_to_proto(e: Explanation) -> inference_pb2.ExplainResponse:
    return inference_pb2.ExplainResponse(
        num_prompt_tokens=e.num_prompt_tokens, num_chunks=e.num_chunks, chosen=route_to_proto(e.chosen),
        candidates=[inference_pb2.RouteCandidate(
            prediction=route_to_proto(c.prediction), num_running=c.num_running, num_waiting=c.num_waiting,
            num_queued_prefill_tokens=c.num_queued_prefill_tokens, kv_usage=c.kv_usage) for c in e.candidates])


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)


async def _abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
    """End the call with `e`'s status (and, when rate limited, `retry-after` seconds)."""
    trailing = (("retry-after", str(e.retry_after_s)),) if isinstance(e, RateLimitedError) else ()
    await context.abort(error_status(e).grpc_code, public_message(e), trailing_metadata=trailing)


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, router: Router, gate: Gate | None = None) -> None:
        self.router = router
        self.gate = gate or Gate()
        self._owners: dict[str, str] = {}
        """req_id -> tenant name of the in-flight requests, with API keys (Abort's ownership check)."""

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> Tenant | None:
        try:
            return self.gate.authenticate(_authorization(context))
        except RouterError as e:
            await _abort(context, e)

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        tenant = await self._authenticate(context)
        try:
            inp = input_from_proto(request)
            grant = self.gate.admit(tenant, inp.tenant)
        except InvalidRequestError as e:
            self.router.metrics.count_invalid()
            await _abort(context, e)
        except RouterError as e:
            await _abort(context, e)
        inp.tenant = grant.namespace
        inp.timeout_s = context.time_remaining()  # None without a deadline: the router's default
        failure: Exception | None = None
        owned = self._claim(tenant, inp.req_id)
        try:
            async with contextlib.aclosing(self.gate.meter(grant, self.router.generate(inp))) as deltas:
                async for delta in deltas:
                    owned = owned or self._claim(tenant, delta.req_id)  # the router named it
                    yield delta_to_proto(delta)
        except Exception as e:
            failure = e
        finally:
            if owned:
                del self._owners[owned]
        if failure is not None:
            status = error_status(failure)
            if status.label == "error":
                logger.error("request %r failed", request.request_id, exc_info=failure)
            await _abort(context, failure)

    def _claim(self, tenant: Tenant | None, req_id: str) -> str:
        """Record `tenant` as the owner of `req_id` unless it has one; the id if claimed, else ""."""
        if tenant is None or not req_id or req_id in self._owners:
            return ""
        self._owners[req_id] = tenant.name
        return req_id

    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortResponse:
        tenant = await self._authenticate(context)
        if tenant is not None and self._owners.get(request.request_id) != tenant.name:
            return common_pb2.AbortResponse(found=False)  # another tenant's request, or none
        return common_pb2.AbortResponse(found=self.router.abort(request.request_id))

    async def Explain(self, request: inference_pb2.GenerateRequest, context) -> inference_pb2.ExplainResponse:
        """The router's placement of `request` now, without sending it (rate limited as a request)."""
        tenant = await self._authenticate(context)
        try:
            inp = input_from_proto(request)
            inp.tenant = self.gate.admit(tenant, inp.tenant).namespace
            return explanation_to_proto(await self.router.explain(inp))
        except InvalidRequestError as e:
            self.router.metrics.count_invalid()
            await _abort(context, e)
        except RouterError as e:
            await _abort(context, e)

    async def ListModels(self, request: inference_pb2.ListModelsRequest, context) -> inference_pb2.ListModelsResponse:
        await self._authenticate(context)
        return inference_pb2.ListModelsResponse(models=[
            inference_pb2.Model(id=m.id, max_model_len=m.max_model_len, num_workers=m.num_workers)
            for m in self.router.list_models()])


class RouterHealth:
    """The router's grpc.health.v1 statuses: Inference always SERVING, "" SERVING while `router.ready`."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.servicer = health.aio.HealthServicer()
        self._ready: bool | None = None

    async def update(self) -> None:
        """Set "" from the router's readiness now (logged when it changes)."""
        ready = self.router.ready
        if ready == self._ready:
            return
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.servicer.set("", status)
        logger.info("router %s: a worker serves model %s" if ready else "router %s: no worker serves model %s",
                    "ready" if ready else "not ready", self.router.model.name)

    async def run(self) -> None:
        """Follow the router's readiness every registry refresh, until cancelled."""
        while True:
            await self.update()
            await asyncio.sleep(self.router.config.refresh_s)


async def start_grpc_server(router: Router, host: str = "127.0.0.1", port: int = 0, gate: Gate | None = None,
                            credentials: grpc.ServerCredentials | None = None, health_status: RouterHealth | None = None,
                            max_message_bytes: int = 4 << 20) -> tuple[grpc.aio.Server, int]:
    """Serve Inference + health + reflection on host:port (0 picks a free port), over TLS with
    `credentials`; returns the started server and its port. Raises OSError when the port cannot be
    bound. `health_status`: the health statuses to serve (else a RouterHealth set once, here; its
    owner runs `health_status.run()` to follow the router's readiness). `max_message_bytes`: the
    largest request message (RESOURCE_EXHAUSTED past it)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", max_message_bytes)],
                             interceptors=[DecodeErrorInterceptor()])
    try:
        address = f"{host}:{port}"
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from e
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(router, gate), server)
    health_status = health_status or RouterHealth(router)
    health_pb2_grpc.add_HealthServicer_to_server(health_status.servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    await server.start()
    await health_status.servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_status.update()
    return server, bound
