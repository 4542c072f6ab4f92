"""The router's configuration (`RouterConfig`): one dataclass, validated on construction; `kvweave
router`'s flags map onto its fields (controlplane/router_main.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.disagg import DisaggConfig
from controlplane.image_fetch import DEFAULT_FETCH_TIMEOUT_S
from controlplane.policies import DEFAULT_POLICY
from kvstore.index import MEDIUMS
from kvweave.defaults import DEFAULT_MODEL, MAX_CHUNKS_PER_REQUEST, REGISTRY_LEASE_S, WAITING_HEARTBEAT_S
from kvweave.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES_PER_REQUEST, ImageLimits


@dataclass
class RouterConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the worker registry and the KV index."""
    model: str = DEFAULT_MODEL
    """Built-in model name, HF folder or .gguf: gives the tokenizer and the model name workers serve."""
    policy: str = DEFAULT_POLICY
    policy_config: dict = field(default_factory=dict)
    """Keyword options of the policy (e.g. prefill_weight for prefix_aware)."""
    max_inflight: int = 1024
    """Admission control: requests beyond this many in flight get OverloadedError (429)."""
    lease_s: float = REGISTRY_LEASE_S
    """The workers' registry lease."""
    refresh_s: float = 0.5
    """How often the registry is re-read."""
    max_attempts: int = 3
    """Workers tried per request before its first token."""
    request_timeout_s: float = 600.0
    """Deadline of a request whose caller gives none (HTTP, gRPC without a deadline): past it the
    request ends with 504 / DEADLINE_EXCEEDED and its work on the worker is cancelled."""
    stall_timeout_s: float = 60.0
    """A worker stream that sends nothing for this long is stalled: its circuit breaker opens and the
    request is retried or migrated. A request waiting for its first token is not: its worker sends
    a heartbeat every WAITING_HEARTBEAT_S (1 s) meanwhile, so this must be at least twice that."""
    max_migrations: int = 2
    """Times a request that has streamed tokens may move to another worker when its worker fails."""
    breaker_probe_s: float = 0.5
    """How often a worker whose circuit breaker is open is probed (grpc.health.v1)."""
    breaker_min_open_s: float = 1.0
    """An open circuit breaker stays open at least this long."""
    index_mediums: tuple[str, ...] = MEDIUMS
    """KV-index tiers that count as cache hits (fastest first)."""
    chunk_separator: str | None = None
    """Splits plain text prompts: the pieces strictly between two separators are reusable chunks
    (None: plain prompts are not split)."""
    max_chunks_per_request: int = MAX_CHUNKS_PER_REQUEST
    """Most reusable chunks one request may carry."""
    divergence_ratio: float = 0.5
    """A request's reused tokens diverge from the router's prediction when they differ by more than
    this share (and `divergence_min_tokens`); counted per worker (controlplane/explain.py)."""
    divergence_min_tokens: int = 32
    """Differences of at most this many tokens never count as divergence (a worker recomputes a
    prompt's last token, so a fully cached prompt delivers up to a block less than predicted)."""
    load_sync_s: float = 0.1
    """How often this router publishes its in-flight requests per worker to Redis and reads the other
    router replicas' (controlplane/replica_load.py)."""
    disagg_threshold_tokens: int | None = None
    """Uncached prompt tokens from which a request may be prefilled on a prefill worker (None: the
    decode worker's step token budget)."""
    disagg_max_prefill_queue_tokens: int = 16384
    """A prefill worker with this many queued prefill tokens takes no more remote prefills."""
    disagg_handoff_margin: float = 1.0
    """Remote prefill only when the predicted KV handoff takes under this share of the predicted
    local prefill."""
    max_images_per_request: int = MAX_IMAGES_PER_REQUEST
    """Most images one request may carry (vision-language models)."""
    max_image_bytes: int = MAX_IMAGE_BYTES
    """Largest encoded image a request may carry, in bytes."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Largest image a request may carry, in pixels (width x height, read from its header)."""
    allow_image_urls: bool = False
    """Fetch http(s) image URLs of chat content parts (off: a 400 asks for base64 data URLs). The
    router then reaches whatever host a client names: restrict it with image_url_domains."""
    image_url_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    """Time to fetch one image URL (connect, answer and body), seconds."""
    image_url_domains: str | None = None
    """Comma-separated hosts image URLs may name (each with its subdomains); None: any host."""

    def __post_init__(self) -> None:
        if self.max_inflight <= 0 or self.max_attempts <= 0:
            raise ValueError("max_inflight and max_attempts must be positive")
        if self.max_chunks_per_request <= 0:
            raise ValueError("max_chunks_per_request must be positive")
        if self.chunk_separator == "":
            raise ValueError("chunk_separator must be a non-empty string (or None)")
        if self.lease_s <= 0 or self.refresh_s <= 0:
            raise ValueError("lease_s and refresh_s must be positive")
        if min(self.request_timeout_s, self.stall_timeout_s, self.breaker_probe_s) <= 0:
            raise ValueError("request_timeout_s, stall_timeout_s and breaker_probe_s must be positive")
        if self.stall_timeout_s < 2 * WAITING_HEARTBEAT_S:
            raise ValueError(f"stall_timeout_s must be at least twice the workers' heartbeat while a request "
                             f"waits for its first token ({WAITING_HEARTBEAT_S:g} s)")
        if not 0.0 < self.divergence_ratio <= 1.0 or self.divergence_min_tokens < 0:
            raise ValueError("divergence_ratio must be in (0, 1] and divergence_min_tokens >= 0")
        if self.load_sync_s <= 0:
            raise ValueError("load_sync_s must be positive")
        if self.max_migrations < 0 or self.breaker_min_open_s < 0:
            raise ValueError("max_migrations and breaker_min_open_s must not be negative")
        if self.image_url_timeout_s <= 0:
            raise ValueError("image_url_timeout_s must be positive")
        self.image_limits = ImageLimits(self.max_image_bytes, self.max_image_pixels, self.max_images_per_request,
                                        self.allow_image_urls)
        self.disagg = DisaggConfig(self.disagg_threshold_tokens, self.disagg_max_prefill_queue_tokens,
                                   self.disagg_handoff_margin)
