"""Plain data the frontends exchange with the router (protobuf and JSON stay in the frontends)."""
from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.explain import RoutePrediction
from kvweave.sampling_params import SamplingParams


@dataclass
class GenerateInput:
    """One request as the frontends hand it over: a text or token-id prompt, segments, or chat messages.

    Exactly one of `prompt`, `segments`, `messages` is set. `segments` are (text, reusable) pairs:
    reusable ones are chunks whose KV may be reused wherever they appear. Chat messages may mark
    documents (`{"kvweave": {"document": true}}` on a message, or content parts of type "document"),
    see kvweave/segments.py."""

    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    segments: list[tuple[str, bool]] | None = None
    params: SamplingParams | None = None
    model: str = ""
    """Empty: the router's model."""
    req_id: str = ""
    session_id: str = ""
    tenant: str = ""
    """Cache namespace: tenants never share KV."""
    auto_max_tokens: bool = False
    """Generate up to the context length when set (OpenAI chat's default); params.max_tokens otherwise."""
    timeout_s: float | None = None
    """Seconds the caller gives the request (a gRPC caller's deadline); None: the router's
    `request_timeout_s`."""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens served from prefix-cached blocks."""
    chunk_reused_tokens: int = 0
    """Prompt tokens served from chunk-caches (reusable chunks), recomputed ones included."""
    recomputed_tokens: int = 0
    """Of the chunk-reused tokens, those recomputed in their new context."""
    disaggregation: str = ""
    """With prefill workers in the cluster: "remote" (prefilled on `prefill_worker_id`, decoded on the
    delta's worker) or why the request stayed on one worker (controlplane/disagg.py REASONS, or
    prefill_failed); empty otherwise."""
    prefill_worker_id: str = ""
    num_migrations: int = 0
    """Times the request moved to another worker mid-stream (its worker died or stalled)."""
    route: RoutePrediction | None = None
    """What the router predicted for the worker it chose (controlplane/explain.py); None when the
    request was not placed by a policy here."""
    images_cached: int = 0
    """Images of the prompt whose embeddings the (prefill) worker had cached, fetched from a peer (an
    encode worker), or encoded itself."""
    images_fetched: int = 0
    images_encoded: int = 0
    route_divergence: str = ""
    """"under" or "over" when the tokens the worker reused diverged from the prediction (explain.py's
    `check_delivery`); "" when they agreed or were not compared (migrated or remotely prefilled)."""

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the worker computed: the prompt less what was reused, plus the recomputed."""
        return self.prompt_tokens - self.cached_tokens - self.chunk_reused_tokens + self.recomputed_tokens


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float]


@dataclass(slots=True)
class Delta:
    """New text and tokens since the previous delta; the last has finished=True and the usage."""

    req_id: str
    worker_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    """"stop", "length" or "abort" on the last delta."""
    stop_reason: str = ""
    usage: Usage | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class ModelCard:
    id: str
    max_model_len: int
    num_workers: int
