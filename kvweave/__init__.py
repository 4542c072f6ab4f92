"""kvweave: a distributed LLM serving cluster that never computes the same KV twice.

The client SDK is importable from here (`kvweave.Client`, `kvweave.AsyncClient`); importing the
package stays cheap (grpc and protobuf, no torch).
"""
from kvweave.client import AsyncClient, Client
from kvweave.client_types import (Completion, GenerateDelta, InvalidRequest, KVWeaveError, ModelInfo, Overloaded,
                                  Segment, Timeout, TokenLogprob, Unavailable, Usage)

__all__ = ["AsyncClient", "Client", "Completion", "GenerateDelta", "InvalidRequest", "KVWeaveError", "ModelInfo",
           "Overloaded", "Segment", "Timeout", "TokenLogprob", "Unavailable", "Usage"]
