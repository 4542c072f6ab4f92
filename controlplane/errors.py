"""The router's typed errors and the one table that maps them to HTTP and gRPC statuses.

Invalid input is `kvweave.errors.InvalidRequestError` everywhere (router, engine, worker), so the
same exception means 400 / INVALID_ARGUMENT whichever layer found the problem.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from kvweave.errors import InvalidRequestError


class RouterError(Exception):
    """Base of the router's own errors."""


class UnknownModelError(InvalidRequestError):
    """The request names a model this router does not serve."""


class NoWorkerError(RouterError):
    """No eligible worker is registered, or every worker tried failed before the first token."""


class OverloadedError(RouterError):
    """Admission control: too many requests in flight."""


class AuthenticationError(RouterError):
    """No API key, or an unknown one, where keys are configured (controlplane/auth.py)."""

    error_code = "invalid_api_key"


class PermissionDeniedError(RouterError):
    """The caller's API key does not allow what the request asks (another tenant)."""

    error_code = "permission_denied"


class RateLimitedError(OverloadedError):
    """The API key's requests or tokens per minute are used up; `retry_after_s`: when to try again."""

    error_code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkerFailedError(RouterError):
    """A worker failed after the request started streaming and it could not be migrated (no worker
    left, or `max_migrations` reached), or a worker rejected it outright."""


class DeadlineExceededError(RouterError):
    """The request's deadline (the gRPC caller's, else `RouterConfig.request_timeout_s`) passed."""


@dataclass(frozen=True, slots=True)
class ErrorStatus:
    http_status: int
    grpc_code: grpc.StatusCode
    type: str
    """OpenAI error `type`."""
    label: str
    """`status` label of kvweave_router_requests."""


_STATUSES: tuple[tuple[type[BaseException], ErrorStatus], ...] = (
    (InvalidRequestError, ErrorStatus(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error", "invalid")),
    (AuthenticationError, ErrorStatus(401, grpc.StatusCode.UNAUTHENTICATED, "invalid_request_error",
                                      "unauthenticated")),
    (PermissionDeniedError, ErrorStatus(403, grpc.StatusCode.PERMISSION_DENIED, "permission_error",
                                        "permission_denied")),
    (RateLimitedError, ErrorStatus(429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error", "rate_limited")),
    (OverloadedError, ErrorStatus(429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error", "overloaded")),
    (NoWorkerError, ErrorStatus(503, grpc.StatusCode.UNAVAILABLE, "service_unavailable", "no_worker")),
    (WorkerFailedError, ErrorStatus(502, grpc.StatusCode.INTERNAL, "worker_error", "worker_error")),
    (DeadlineExceededError, ErrorStatus(504, grpc.StatusCode.DEADLINE_EXCEEDED, "timeout_error", "deadline")),
)
_INTERNAL = ErrorStatus(500, grpc.StatusCode.INTERNAL, "internal_error", "error")


def error_status(exc: BaseException) -> ErrorStatus:
    """How frontends report `exc`; anything unexpected is a 500 / INTERNAL."""
    for cls, status in _STATUSES:
        if isinstance(exc, cls):
            return status
    return _INTERNAL


def public_message(exc: BaseException) -> str:
    """The message a client may see: ours verbatim, never the text of an unexpected exception."""
    if error_status(exc) is _INTERNAL:
        return "internal error in the router (see its log)"
    return str(exc)
