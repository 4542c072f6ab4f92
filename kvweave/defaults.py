"""Defaults that two components share, defined once.

The router models what the workers do (how much of a reused chunk they recompute, how long a
registration lives), so each of these numbers must be the same on both sides: the components'
config dataclasses take their defaults from here.
"""
from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"
"""The built-in model the engine serves and the router tokenizes for when none is named."""
BLOCK_SIZE = 16
"""Tokens per KV block: the engine's paged cache, the block-hash chain, the router's cost model."""
REGISTRY_LEASE_S = 3.0
"""How long a worker's registration and its KV-index entries live without a heartbeat; the router
also skips a worker that failed a call for this long."""
CHUNK_RECOMPUTE_RATIO = 0.08
"""Share of a reused chunk-cache's tokens a worker recomputes in the new context (the engine's
`chunk_recompute_ratio`); the router's chunk_aware policy prices reuse with the same share."""
MAX_CHUNKS_PER_REQUEST = 64
"""Most reusable chunks (segments, documents) one request may carry, in the router and the engine."""
WAITING_HEARTBEAT_S = 1.0
"""While a request waits for its first token (queued behind others, or prefilling a long prompt),
its worker sends an empty response this often, so the router tells a busy worker from a stalled
one; the router's `stall_timeout_s` must be at least twice as long."""
