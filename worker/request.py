"""Request state inside the engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kvweave.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything after this point is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


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
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache at first scheduling (-1 before)."""
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    block_hashes: list = field(default_factory=list)
    """Leading block hashes computed before admission (by the KV prefetcher), reused by the block manager."""
    kv_staged: dict = field(default_factory=dict)
    """Block hash -> (KV tensor, source) read for this request while it waited (SSD, peer)."""
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)
    """(start, length) of each reusable chunk in the prompt (sorted, disjoint): text whose KV may come
    from a chunk-cache at any position (retrieved documents, tool outputs)."""
    chunk_staged: dict = field(default_factory=dict)
    """Chunk index -> chunk-cache read for this request while it waited."""
    num_chunk_reused_tokens: int = 0
    """Prompt tokens whose KV came from chunk-caches (recomputed ones included)."""
    num_recomputed_tokens: int = 0
    """Of those, the tokens recomputed in their new context."""
    blend: object | None = None
    """The chunk blend in progress (worker.chunk_blend.BlendPlan) while its pieces run."""
    num_exact_tokens: int | None = None
    """Leading tokens whose KV is exact (None: all); only those may enter the prefix cache."""
    chunks_stored: bool = False
    internal: bool = False
    """Made by the engine to compute a chunk-cache: no caller sees its output."""
    chunks_looked_up: bool = False
    """The local store was asked for this request's chunk-caches (by the prefetcher or at submit)."""

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

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
