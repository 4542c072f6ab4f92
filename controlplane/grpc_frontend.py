"""The router's gRPC face: `kvweave.v1.Inference` (Generate, Abort, ListModels), grpc.health.v1 and
server reflection. Protobuf stops here: requests become `GenerateInput`, `Delta`s become
`GenerateResponse`s. Errors end the call with the status of `controlplane.errors.error_status` and
a message, never a traceback.
"""
from __future__ import annotations

import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.errors import error_status, public_message
from controlplane.router import Delta, GenerateInput, Router
from kvweave.convert import finish_reason_to_proto, sampling_from_proto
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from kvweave.errors import InvalidRequestError
from kvweave.grpc_decode import DecodeErrorInterceptor
from kvweave.limits import check_id

logger = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


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
        inp.messages = [{"role": m.role, "content": m.content} | ({"kvweave": {"document": True}} if m.document else {})
                        for m in msg.chat.messages]
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
                disaggregation=u.disaggregation, prefill_worker_id=u.prefill_worker_id))
    return msg


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            inp = input_from_proto(request)
        except InvalidRequestError as e:
            self.router.metrics.count_invalid()
            await context.abort(error_status(e).grpc_code, public_message(e))
        failure: Exception | None = None
        try:
            async with contextlib.aclosing(self.router.generate(inp)) as deltas:
                async for delta in deltas:
                    yield delta_to_proto(delta)
        except Exception as e:
            failure = e
        if failure is not None:
            status = error_status(failure)
            if status.label == "error":
                logger.error("request %r failed", request.request_id, exc_info=failure)
            await context.abort(status.grpc_code, public_message(failure))

    async def Abort(self, request: common_pb2.AbortRequest, context) -> common_pb2.AbortResponse:
        return common_pb2.AbortResponse(found=self.router.abort(request.request_id))

    async def ListModels(self, request: inference_pb2.ListModelsRequest, context) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=[
            inference_pb2.Model(id=m.id, max_model_len=m.max_model_len, num_workers=m.num_workers)
            for m in self.router.list_models()])


async def start_grpc_server(router: Router, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Serve Inference + health (SERVING) + reflection on host:port (0 picks a free port); returns the
    started server and its port. Raises OSError when the port cannot be bound."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[DecodeErrorInterceptor()])
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from e
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(router), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
