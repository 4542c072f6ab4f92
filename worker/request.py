"""Request state inside the engine.

A request holds no tensors: KV staged for it before admission (prefix blocks read from SSD or a
peer, chunk-caches) is handed to the worker side of the KV connector when it is submitted
(worker/kv_connector_worker.py), and the request keeps only what the scheduler decides with (which
block hashes and which chunks are staged, `KVTransferState`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from worker.chunk_blend import BlendPlan
from worker.kv_handoff import Handoff
from kvweave.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    WAITING_FOR_KV = 1
    """Blocks allocated; the KV connector is loading or placing its KV (the step goes on without it)."""
    RUNNING = 2
    PREEMPTED = 3
    # Everything after this point is finished.
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_HANDOFF = 7
    """A prefill-only request whose KV is held for a decode worker (worker/kv_handoff.py)."""
    FINISHED_ERROR = 8
    """This request alone failed inside a step (its sampling or output processing); `error` says why."""

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_HANDOFF: "handoff",
                RequestStatus.FINISHED_ERROR: "error"}.get(self)


@dataclass
class KVTransferState:
    """What the scheduler knows of a request's KV outside the device."""

    staged_blocks: dict[bytes, str] = field(default_factory=dict)
    """Block hash -> source ("ssd", "peer") of prefix blocks staged before admission."""
    staged_chunks: set[int] = field(default_factory=set)
    """Indexes of the request's chunks whose chunk-caches are staged."""
    chunks_looked_up: bool = False
    """The local store was asked for this request's chunk-caches (by the prefetcher or at submit)."""
    num_loading_tokens: int = 0
    """While WAITING_FOR_KV: the request's tokens computed once the connector's load finishes."""


@dataclass
class ChunkState:
    """A request's reusable chunks and what their reuse did."""

    num_reused_tokens: int = 0
    """Prompt tokens whose KV came from chunk-caches (recomputed ones included)."""
    num_recomputed_tokens: int = 0
    """Of those, the tokens recomputed in their new context."""
    num_exact_tokens: int | None = None
    """Leading tokens whose KV is exact (None: all); only those may enter the prefix cache."""
    stored: bool = False
    """The chunks computed for this request were handed to the store (or to chunk requests)."""


@dataclass
class Request:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_extra: bytes = b""
    """Encoded extra keys of the block hash chain (model, tenant namespace)."""
    arrival_time: float = 0.0
    priority: int = 0
    """Lower runs first among waiting requests of the same arrival order (hook for later policies)."""
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)
    """(start, length) of each reusable chunk in the prompt (sorted, disjoint): text whose KV may come
    from a chunk-cache at any position (retrieved documents, tool outputs)."""
    internal: bool = False
    """Made by the engine to compute a chunk-cache: no caller sees its output."""
    num_prompt_logits: int = 0
    """Return the logits of the prompt's last positions too (teacher forcing: `kvweave bench rag`)."""
    prefill_only: bool = False
    """Compute the prompt and the first token, then hand the KV off to a decode worker."""
    handoff: Handoff | None = None
    """On a prefill worker: the handoff made for it. On a decode worker: the handoff it continues
    from (its first output token comes with it)."""
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache at first scheduling (-1 before)."""
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    error: str | None = None
    """Why the request failed (FINISHED_ERROR): a short reason its client may read."""
    block_hashes: list = field(default_factory=list)
    """Leading block hashes computed before admission (by the KV prefetcher), reused by the block manager."""
    kv: KVTransferState = field(default_factory=KVTransferState)
    chunks: ChunkState = field(default_factory=ChunkState)
    blend: BlendPlan | None = None
    """The chunk blend in progress (worker.chunk_blend.BlendPlan) while its pieces run."""
    mm_inputs: Any = None
    """The embeddings of the prompt's image placeholders (worker.multimodal.MultimodalInputs), or None."""
    images: Any = None
    """The request's images (worker.multimodal.PendingImages) until `mm_inputs` is made from them."""
    embedding_holders: list[tuple[str, str]] = field(default_factory=list)
    """Empty, or per image (worker id, address) of a worker the router says holds its embedding
    ("" when it knows none): fetched from there first."""
    image_sources: dict[str, int] = field(default_factory=dict)
    """Where its images' embeddings came from: "cached" (this worker's caches), "fetched" (a peer),
    "encoded" (encoded here) -> how many images."""

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
