"""kvweave: a distributed LLM serving cluster that never computes the same KV twice.

This package is the bottom layer every process shares: the generated gRPC stubs (`kvweave.v1`),
the torch-free pieces the router, the workers and the clients all need (errors, sampling
parameters, tokenization and segments, the registry, proto converters, shared defaults), and the
client SDK (`kvweave.Client`, `kvweave.AsyncClient`). It imports nothing from the rest of the
project. `import kvweave` is cheap: the SDK names below are imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

_CLIENTS = ("AsyncClient", "Client")
_CLIENT_TYPES = ("Completion", "GenerateDelta", "InvalidRequest", "KVWeaveError", "ModelInfo", "Overloaded",
                 "PermissionDenied", "RouteCandidate", "RouteExplanation", "RouteInfo", "Segment", "Timeout",
                 "TokenLogprob", "Unauthenticated", "Unavailable", "Usage")

__all__ = sorted([*_CLIENTS, *_CLIENT_TYPES])

if TYPE_CHECKING:
    from kvweave.client import AsyncClient, Client
    from kvweave.client_types import (Completion, GenerateDelta, InvalidRequest, KVWeaveError, ModelInfo, Overloaded,
                                      PermissionDenied, RouteCandidate, RouteExplanation, RouteInfo, Segment, Timeout,
                                      TokenLogprob, Unauthenticated, Unavailable, Usage)


def __getattr__(name: str) -> Any:
    if name in _CLIENTS:
        from kvweave import client as module
    elif name in _CLIENT_TYPES:
        from kvweave import client_types as module
    else:
        raise AttributeError(f"module 'kvweave' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
