"""What crosses from the scheduler to the model runner and the KV connector, and back: plain data.

Shaped like vLLM v1's `SchedulerOutput`: requests scheduled for the first time (or again after a
preemption) come in full, running ones as diffs (new blocks, tokens computed so far); each gets a
number of tokens this step, so chunked prefill is "fewer tokens this step". The runner keeps its
own copy of each request's tokens and blocks. Chunk blends add sparse pieces. The connector
metadata says which KV to load into which blocks, which chunk-caches to place, and which blocks
and chunks to save; the connector answers with what finished (`KVConnectorOutput`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from worker.chunk_blend import BlendPiece
from kvweave.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    req_id: str
    token_ids: list[int]
    """Every token known so far (the prompt, and the outputs of a resumed request)."""
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    num_prompt_tokens: int
    num_prompt_logits: int = 0
    """Also return the logits of the last this many prompt positions."""
    sampler_state: bytes = b""
    """A seeded request continued from a prefill handoff: its generator's state (else empty)."""


@dataclass(slots=True)
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    """Blocks allocated to each since it was last scheduled."""
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass(slots=True)
class LoadJob:
    """Copy KV held outside the device into a waiting request's blocks."""

    req_id: str
    block_ids: list[int]
    """Destination blocks, in prompt order (the request's blocks from `first_block`)."""
    first_block: int
    """Index in the prompt of the first block to load."""
    block_hashes: list[bytes]
    """Source of each block: staged on the request, else the host tiers."""
    place: list[PlaceJob] = field(default_factory=list)
    """Chunk-caches to place after the blocks are loaded."""


@dataclass(slots=True)
class PlaceJob:
    chunk_index: int
    start: int
    """Position of the chunk's first token in the prompt."""
    num_tokens: int


@dataclass(slots=True)
class SaveBlocksJob:
    """Write full device blocks through to the host tiers (the blocks are held until it finishes)."""

    block_ids: list[int]
    block_hashes: list[bytes]
    costs: list[float]
    """Recompute cost of each block (deeper blocks cost more), for cost-aware eviction."""


@dataclass(slots=True)
class SaveChunkJob:
    """Store a chunk computed in a request's blocks, re-based to position 0."""

    key: bytes
    block_ids: list[int]
    """The request's blocks covering the chunk (held until it finishes)."""
    first_block: int
    """Index in the request of block_ids[0]."""
    start: int
    num_tokens: int


@dataclass(slots=True)
class KVConnectorMetadata:
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveBlocksJob] = field(default_factory=list)
    chunk_saves: list[SaveChunkJob] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    """Requests gone: the connector drops what it staged for them."""

    @property
    def has_jobs(self) -> bool:
        return bool(self.loads or self.saves or self.chunk_saves)


@dataclass(slots=True)
class LoadResult:
    num_blocks: int
    """Leading blocks loaded (a block that could not be loaded ends the run)."""
    sources: dict[str, int] = field(default_factory=dict)
    """Blocks loaded per source (dram, ssd, peer)."""
    placed: bool = True
    """The chunk-caches were placed."""


@dataclass(slots=True)
class KVConnectorOutput:
    loads: dict[str, LoadResult] = field(default_factory=dict)
    saved_blocks: list[list[int]] = field(default_factory=list)
    """The blocks of each finished block save (their holds are released)."""
    saved_chunks: list[tuple[bytes, list[int], bool]] = field(default_factory=list)
    """(chunk key, its blocks, stored) of finished chunk saves."""


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens each request computes this step, decodes first, then prefill chunks and blend pieces."""
    blend_pieces: dict[str, BlendPiece] = field(default_factory=dict)
    """Requests whose tokens this step are a sparse blend piece (their positions are given)."""
    finished_req_ids: set[str] = field(default_factory=set)
    """Requests finished or preempted since the last step: the runner drops their state."""
    preempted_req_ids: list[str] = field(default_factory=list)
    kv_connector_metadata: KVConnectorMetadata = field(default_factory=KVConnectorMetadata)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())
