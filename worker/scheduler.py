"""Continuous-batching scheduler with stall-free chunked prefill (Sarathi-Serve).

Each step has a token budget (`max_num_batched_tokens`). Running requests are served first, decodes
before prefill chunks, so ongoing decodes never stall behind a long prompt; waiting requests then
fill what is left of the budget with prefill chunks. A chunk deep into a long prompt also attends
to everything before it, so with `attention_cost_len` = L a chunk of n tokens starting at position
p costs n * (1 + (p + n/2) / L) budget tokens (L: the context length at which a token's attention
costs as much as its projections and MLP); later chunks get shorter and every step stays about as
long as the first, which is what bounds inter-token latency. When blocks run out, the most recently
admitted running request is preempted by recompute (its blocks freed, its progress reset; the
prefix cache usually gives most of it back when it resumes). The output of `schedule` is plain
data; only `update_from_output` changes request state.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

from worker.block_manager import BlockManager
from worker.config import ConfigError
from worker.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Cap on running requests."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (decodes + prefill chunks)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps; when off, a prompt is prefilled in one step."""
    max_model_len: int = 2048
    attention_cost_len: int = 0
    """Context length at which a prefill token's attention costs as much as the rest of its
    forward; prefill chunks are charged for their attention (see above). 0: count tokens only."""

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill:
            # Without chunking a whole prompt must fit in one step.
            self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_model_len)


@dataclass(slots=True)
class ScheduledRequest:
    req_id: str
    token_ids: list[int]
    """Tokens whose KV is computed this step."""
    start_pos: int
    """Position of the first of them (= tokens already computed)."""
    block_table: list[int]
    sample: bool
    """This step reaches the end of the known tokens: sample the next one."""
    positions: list[int] | None = None
    """Positions of the tokens when they are a sparse piece of a chunk blend (not contiguous)."""
    correction: object | None = None
    """The piece's chunk correction (worker.chunk_blend.ChunkCorrection)."""

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.positions is None


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    """Decodes (one token) first, then prefill chunks."""
    preempted_req_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 eos_token_ids: frozenset[int] = frozenset(), connector=None, blender=None) -> None:
        """`connector` (worker.kv_connector.KVConnector): onboards prefix blocks held outside the
        device (host tiers, staged from peers) when a request is admitted."""
        self.config = config
        self.connector = connector
        self.blender = blender
        """worker.chunk_blend.ChunkBlender: blends staged chunk-caches into requests at admission."""
        self.eos_token_ids = eos_token_ids
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    def add_request(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_req_ids:
            self._schedule_waiting(out, budget)
        out.scheduled.sort(key=lambda s: not s.is_decode)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # Decodes first, then running prefills, each in admission order.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens != 1)
        for req in order:
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if req.blend is not None:  # its slots were allocated at admission
                piece = self._blend_piece(req)
                out.scheduled.append(piece)
                budget -= len(piece.token_ids)
                continue
            num_new, cost = self._chunk(req.num_computed_tokens, req.num_tokens - req.num_computed_tokens, budget)
            if num_new == 0:
                continue
            while not self.block_manager.allocate_slots(req.req_id, req.num_computed_tokens + num_new):
                victim = self.running[-1]
                budget += self._preempt(victim, out)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            out.scheduled.append(self._make_scheduled(req, num_new))
            budget -= cost
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits, num_hit_tokens = bm.get_computed_blocks(req.req_id, req.all_token_ids, req.cache_extra,
                                                          req.block_hashes)
            num_ext = 0
            if self.connector is not None and bm.enable_prefix_caching:
                max_blocks = (req.num_tokens - 1) // bm.block_size  # at least one token is computed
                num_ext = self.connector.num_external_blocks(req, len(hits), max_blocks)
            num_cached = num_hit_tokens + num_ext * bm.block_size
            num_new = req.num_tokens - num_cached
            plan = self.blender.plan(req, num_cached) if self.blender is not None else None
            if num_new > budget and not self.config.enable_chunked_prefill and plan is None:
                break
            num_new, cost = self._chunk(num_cached, num_new, budget)
            if num_new == 0:
                break
            if not bm.allocate_slots(req.req_id, max(num_cached + num_new, plan.end if plan else 0), hits):
                break
            if num_ext:  # a block that fails to load ends the run; the chunk then starts earlier
                loaded = num_hit_tokens + self.connector.load_external(req, len(hits), num_ext) * bm.block_size
                if plan is not None and loaded != num_cached:
                    plan = self.blender.plan(req, loaded)  # ends where it did: it has the same last chunk
                num_cached = loaded
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                if self.connector is not None:
                    self.connector.record_admission(req, num_hit_tokens)
            self.running.append(req)
            if plan is not None:
                self.blender.admit(req, plan)
                if plan.pieces:
                    piece = self._blend_piece(req)
                    out.scheduled.append(piece)
                    budget -= len(piece.token_ids)
                else:  # nothing to recompute before `end`: the rest is scheduled from there next step
                    req.blend = None
                    req.num_computed_tokens = plan.end
            else:
                out.scheduled.append(self._make_scheduled(req, num_new))
                budget -= cost

    def _chunk(self, start: int, num_left: int, budget: int) -> tuple[int, int]:
        """Tokens to compute from `start` within `budget`, and the budget they use."""
        n = min(num_left, budget)
        L = self.config.attention_cost_len
        if n <= 1 or not L or not self.config.enable_chunked_prefill:
            return n, n
        # Largest n with n * (1 + (start + n / 2) / L) <= budget.
        a = 1 + start / L
        n = min(n, int(L * (math.sqrt(a * a + 2 * budget / L) - a)))
        n = max(n, min(num_left, 1))
        return n, max(n, math.ceil(n * (1 + (start + n / 2) / L)))

    def _blend_piece(self, req: Request) -> ScheduledRequest:
        """The next sparse piece of the request's chunk blend (worker.chunk_blend)."""
        positions, correction, last = self.blender.next_piece(req)
        return ScheduledRequest(
            req_id=req.req_id,
            token_ids=[req.all_token_ids[q] for q in positions],
            start_pos=positions[0],
            block_table=self.block_manager.get_block_table(req.req_id),
            sample=last and req.blend.end == req.num_tokens,
            positions=positions,
            correction=correction,
        )

    def _make_scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(
            req_id=req.req_id,
            token_ids=req.all_token_ids[start:start + num_new],
            start_pos=start,
            block_table=self.block_manager.get_block_table(req.req_id),
            sample=start + num_new == req.num_tokens,
        )

    def _preempt(self, req: Request, out: SchedulerOutput) -> int:
        """Preempt by recompute; returns the budget given back if it was already scheduled."""
        logger.debug("preempting %s (%d tokens computed)", req.req_id, req.num_computed_tokens)
        out.preempted_req_ids.append(req.req_id)
        given_back = sum(len(s.token_ids) for s in out.scheduled if s.req_id == req.req_id)
        out.scheduled = [s for s in out.scheduled if s.req_id != req.req_id]
        self.running.remove(req)
        self.block_manager.free(req.req_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.blend = None  # planned again at re-admission
        req.num_exact_tokens = None
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        return given_back

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Apply one step's results; return the requests that got a new token."""
        updated = []
        for s in out.scheduled:
            req = self.requests.get(s.req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted during the step
            if s.positions is not None:  # a blend piece: the request moves on once all have run
                req.blend.next_piece += 1
                if req.blend.next_piece < len(req.blend.pieces):
                    continue
                req.num_computed_tokens = req.blend.end
                req.blend = None
            else:
                req.num_computed_tokens += len(s.token_ids)
            exact = req.num_computed_tokens if req.num_exact_tokens is None else \
                min(req.num_computed_tokens, req.num_exact_tokens)
            self.block_manager.cache_full_blocks(req.req_id, req.all_token_ids, exact, req.cache_extra)
            if req.chunk_spans and not req.chunks_stored and req.num_computed_tokens >= req.num_prompt_tokens:
                req.chunks_stored = True
                if self.blender is not None:
                    self.blender.store_new_chunks(req)
            if s.sample:
                req.append_output_token(sampled[s.req_id])
                self._check_stop(req)
                updated.append(req)
        return updated

    def _check_stop(self, req: Request) -> None:
        p, tok = req.params, req.output_token_ids[-1]
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                return self.finish(req.req_id, RequestStatus.FINISHED_STOPPED)
            if tok in p.stop_token_ids:
                req.stop_reason = tok
                return self.finish(req.req_id, RequestStatus.FINISHED_STOPPED)
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            self.finish(req.req_id, RequestStatus.FINISHED_LENGTH)

    def finish(self, req_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request and free its blocks; None when unknown or done."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.block_manager.free(req.req_id)
        return req
