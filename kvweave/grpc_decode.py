"""Undecodable requests are the client's error: INVALID_ARGUMENT, not a server fault.

grpcio answers bytes that do not parse as a method's request message with UNKNOWN ("Exception
deserializing request!"), a server-fault status for a client's mistake. `DecodeErrorInterceptor`, a
grpc.aio server interceptor, makes each unary-request method's deserializer lenient and ends such a
call with INVALID_ARGUMENT naming the expected message, before the servicer runs. Streaming-request
methods are left as they are. Every gRPC server that takes requests from outside the process (the
router's frontend, the worker's service) installs it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

_UNDECODABLE = object()


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        message = f"the request does not decode as the request message of {details.method}"

        def lenient(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:  # DecodeError, or bytes that break the parser otherwise
                return _UNDECODABLE

        if handler.response_streaming:
            return handler._replace(request_deserializer=lenient,
                                    unary_stream=_guard_stream(handler.unary_stream, message))
        return handler._replace(request_deserializer=lenient, unary_unary=_guard_unary(handler.unary_unary, message))


def _guard_unary(behavior: Callable, message: str) -> Callable:
    async def guarded(request, context: grpc.aio.ServicerContext):
        if request is _UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return await behavior(request, context)
    return guarded


def _guard_stream(behavior: Callable, message: str) -> Callable:
    if not inspect.isasyncgenfunction(behavior):  # a coroutine that writes with context.write
        return _guard_unary(behavior, message)

    async def guarded(request, context: grpc.aio.ServicerContext):
        if request is _UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        async for item in behavior(request, context):
            yield item
    return guarded
