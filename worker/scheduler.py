"""Continuous-batching scheduler with stall-free chunked prefill (Sarathi-Serve).

Each step has a token budget (`max_num_batched_tokens`). Running requests are served first, decodes
before prefill chunks, so ongoing decodes never stall behind a long prompt; waiting requests then
fill what is left of the budget with prefill chunks. A chunk deep into a long prompt also attends
to everything before it, so with `attention_cost_len` = L a chunk of n tokens starting at position
p costs n * (1 + (p + n/2) / L) budget tokens (L: the context length at which a token's attention
costs as much as its projections and MLP); later chunks get shorter and every step stays about as
long as the first, which is what bounds inter-token latency. A waiting request whose next prompt
block a running request is still computing waits for it, unless that request completes the block
in the step being built: then the block is shared like a cache hit within the step (requests
arriving together with one prefix compute it once, `_blocks_being_computed`, and fill the first
step rather than wait a step for it). With `long_prefill_token_threshold` T (vLLM's flag of that
name, with its partial prefills), a prompt with more than T tokens left to compute is long: it gets
at most T tokens a step, at most `max_long_partial_prefills` long prompts get a chunk in one step,
and a waiting long prompt beyond that keeps its place at the head of the queue while the short ones
behind it are admitted. A short prompt arriving behind long ones (a chat turn behind image or
document prompts) then waits for one short step, not for all of theirs. Two more settings keep
that wait short: `long_prefill_chunk_tokens` C < T makes a long prompt's chunks C tokens (the step a
short prompt arrives during is shorter), and with `prioritize_short_prefills` a step's short prompts
are scheduled before its long ones, each long one taking only what their prefill tokens leave of T
(at least one token), so the step that prefills a short prompt is about as long as the short prompt
alone. When blocks run out, the most recently
admitted running request is preempted by recompute (its blocks freed, its progress reset; the
prefix cache usually gives most of it back when it resumes).

The scheduler only decides. `schedule` returns plain data (worker/scheduler_output.py) with the KV
connector's jobs; a request whose KV must first be loaded or placed waits (WAITING_FOR_KV) without
holding up the step. `update_from_connector_output` and `update_from_output` are the only methods
that apply results to request state; `finish` is called by the engine, which decides when a
request ends (worker/output.py `check_stop`).
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass

from worker.block_manager import BlockManager
from worker.chunk_blend import BlendPiece, BlendPlan, ChunkBlender, chunk_request_tokens, next_piece
from worker.config import ConfigError
from worker.kv_connector import KVConnector
from worker.request import Request, RequestStatus
from kvweave.sampling_params import SamplingParams
from worker.scheduler_output import (CachedRequestData, KVConnectorOutput, LoadResult, NewRequestData,
                                     SchedulerOutput)

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128
    """Cap on running requests."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decodes + prefill chunks)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps; when off, a prompt is prefilled in one step."""
    max_model_len: int = 2048
    attention_cost_len: int = 0
    """Context length at which a prefill token's attention costs as much as the rest of its
    forward; prefill chunks are charged for their attention (see above). 0: count tokens only."""
    num_layers: int = 0
    """The model's layers, to charge a partial pass (a blend's scoring pass) for the layers it runs
    (0: charge full tokens)."""
    long_prefill_token_threshold: int = 0
    """A prompt with more tokens than this left to compute is long: at most this many of its tokens
    a step (0: no prompt is long)."""
    max_long_partial_prefills: int = 1
    """Long prompts that get a prefill chunk in one step (with a threshold)."""
    long_prefill_chunk_tokens: int = 0
    """With a threshold: at most this many tokens of a long prompt a step (0: the threshold)."""
    prioritize_short_prefills: bool = False
    """With a threshold: a long prompt's chunk takes only what the step's short prompts' prefill
    tokens leave of the threshold (at least one token)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        check_long_prefill(self.long_prefill_token_threshold, self.max_long_partial_prefills,
                           self.long_prefill_chunk_tokens, self.prioritize_short_prefills)
        if not self.enable_chunked_prefill:
            # Without chunking a whole prompt must fit in one step.
            self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_model_len)


def check_long_prefill(threshold: int, max_partial: int, chunk_tokens: int, prioritize: bool) -> None:
    """ConfigError naming the first bad long-prefill setting (the engine's flags and the scheduler's)."""
    if threshold < 0:
        raise ConfigError(f"long_prefill_token_threshold must be >= 0, got {threshold}")
    if max_partial < 1:
        raise ConfigError(f"max_long_partial_prefills must be >= 1, got {max_partial}")
    if chunk_tokens < 0 or (threshold and chunk_tokens > threshold):
        raise ConfigError(f"long_prefill_chunk_tokens must be in [0, long_prefill_token_threshold = {threshold}], "
                          f"got {chunk_tokens}")
    if not threshold and (chunk_tokens or prioritize):
        raise ConfigError("long_prefill_chunk_tokens and prioritize_short_prefills need a "
                          "long_prefill_token_threshold (which prompts are long)")


class _Batch:
    """The step being built: tokens per request (and blend pieces), in scheduling order."""

    def __init__(self, budget: int, hold_long: bool = False) -> None:
        self.budget = self.full_budget = budget
        self.items: list[tuple[Request, int, BlendPiece | None]] = []
        self.scheduled: set[str] = set()
        self.preempted: list[str] = []
        self.num_long = 0
        """Long prompts (see long_prefill_token_threshold) with a chunk in this step."""
        self.hold_long = hold_long
        """Long prompts get no chunk yet: the short ones are being scheduled first."""
        self.short_prefill = 0
        """Prefill tokens of the short prompts scheduled while long ones were held."""

    def add(self, req: Request, num_tokens: int, cost: int, piece: BlendPiece | None = None) -> None:
        self.items.append((req, num_tokens, piece))
        self.scheduled.add(req.req_id)
        self.budget -= cost
        if self.hold_long and num_tokens > 1 and piece is None:
            self.short_prefill += num_tokens

    def drop(self, req: Request) -> int:
        """Unschedule a request; returns the budget it used (tokens)."""
        given = sum(n for r, n, _ in self.items if r is req)
        self.items = [it for it in self.items if it[0] is not req]
        self.scheduled.discard(req.req_id)
        return given


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, connector: KVConnector | None = None,
                 blender: ChunkBlender | None = None) -> None:
        """`connector`: the KV connector's scheduler role (loads from host tiers and staged KV, saves);
        `blender`: chunk-cache reuse (plans blends, decides which chunks to store)."""
        self.config = config
        self.connector = connector
        self.blender = blender
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """Admitted requests in admission order, those waiting for their KV included."""
        self.requests: dict[str, Request] = {}
        self._finished_req_ids: set[str] = set()
        self._runner_blocks: dict[str, int] = {}
        """Blocks the runner knows of each request it holds state for."""
        self._runner_known: set[str] = set()
        """Requests the runner has seen (a preempted one keeps its generator there until it finishes)."""
        self._chunk_ids = itertools.count(1)

    def add_request(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        batch = _Batch(cfg.max_num_batched_tokens, hold_long=cfg.prioritize_short_prefills
                       and cfg.long_prefill_token_threshold > 0 and cfg.enable_chunked_prefill)
        self._schedule_running(batch)
        if not batch.preempted:
            self._schedule_waiting(batch)
        if batch.hold_long:  # the short prompts are in: now the long ones, running first
            batch.hold_long = False
            self._schedule_running(batch)
            if not batch.preempted:
                self._schedule_waiting(batch)
        return self._build_output(batch)

    def _schedule_running(self, batch: _Batch) -> None:
        # Decodes first, then running prefills, each in admission order.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens != 1)
        for req in order:
            if batch.budget <= 0:
                break
            if req.status != RequestStatus.RUNNING or req.req_id in batch.scheduled:
                continue  # preempted earlier in this loop, waiting for its KV, or in the step already
            if req.blend is not None:  # its slots were allocated at admission
                piece = next_piece(req.blend, batch.budget, alone=not batch.items)
                if piece is not None:
                    cost = self._piece_cost(piece)
                    if cost <= batch.budget or not batch.items:
                        batch.add(req, len(piece.positions), cost, piece)
                continue
            num_left = self._long_cap(req.num_tokens - req.num_computed_tokens, batch)
            if num_left == 0:
                continue
            num_new, cost = self._chunk(req.num_computed_tokens, num_left, batch.budget)
            if num_new == 0:
                continue
            while not self.block_manager.allocate_slots(req.req_id, req.num_computed_tokens + num_new):
                victim = self.running[-1]
                batch.budget += self._preempt(victim, batch)
                if victim is req:
                    break
            if req.status == RequestStatus.RUNNING:
                batch.add(req, num_new, cost)

    def _schedule_waiting(self, batch: _Batch) -> None:
        bm = self.block_manager
        computing = self._blocks_being_computed() if bm.enable_prefix_caching else set()
        in_step: dict = {}  # prompt blocks that requests of this step compute in it, by hash
        if computing:
            for r, n, piece in batch.items:
                if piece is None:
                    in_step.update(self._blocks_computed_in_step(r, r.num_computed_tokens, n))
        deferred: list[Request] = []
        skipped: list[Request] = []
        while self.waiting and batch.budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits, num_hit_tokens = bm.get_computed_blocks(req.req_id, req.all_token_ids, req.cache_extra,
                                                          req.block_hashes)
            if computing and req.handoff is None and not req.kv.staged_chunks:
                hashes = self._prompt_hashes(req)
                # Blocks computed earlier in this step's forward are shared like cache hits: every
                # layer writes the step's K/V before any of its attention reads a context.
                max_hits = (req.num_tokens - 1) // bm.block_size
                while len(hits) < min(len(hashes), max_hits) and hashes[len(hits)] in in_step:
                    hits.append(in_step[hashes[len(hits)]])
                num_hit_tokens = len(hits) * bm.block_size
                if len(hits) < len(hashes) and hashes[len(hits)] in computing:
                    deferred.append(self.waiting.popleft())  # its next block is a hit once computed
                    continue
            max_cached_blocks = (req.num_prompt_tokens - req.num_prompt_logits) // bm.block_size
            if req.num_prompt_logits:  # the positions whose logits it asked for must be computed
                hits = hits[:max_cached_blocks]
                num_hit_tokens = len(hits) * bm.block_size
            num_ext = 0
            if self.connector is not None and bm.enable_prefix_caching:
                num_ext = self.connector.get_num_new_matched_tokens(req, len(hits), max_cached_blocks)
            num_cached = num_hit_tokens + num_ext
            plan = self.blender.plan(req, num_cached) if self.blender is not None else None
            num_new = req.num_tokens - num_cached
            if num_new > batch.budget and not self.config.enable_chunked_prefill and plan is None:
                break
            if plan is None and not num_ext:
                num_left = self._long_cap(num_new, batch)
                if num_left == 0:  # long, and the step has its long prompts: the shorter ones first
                    skipped.append(self.waiting.popleft())
                    continue
                num_new = num_left
            num_new, cost = self._chunk(num_cached, num_new, batch.budget)
            if num_new == 0:
                break
            if not bm.allocate_slots(req.req_id, max(num_cached + num_new, plan.end if plan else 0), hits):
                break
            self.waiting.popleft()
            self.running.append(req)
            req.kv.staged_blocks.clear()  # consumed by this load (or never needed)
            if req.num_cached_tokens < 0 and self.connector is not None:
                self.connector.record_admission(req, num_hit_tokens)
            if num_ext or plan is not None:
                self._start_kv_load(req, num_hit_tokens, num_ext, plan)
                continue
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            batch.add(req, num_new, cost)
            if bm.enable_prefix_caching:
                computing.update(self._prompt_hashes(req)[num_cached // bm.block_size:])
                in_step.update(self._blocks_computed_in_step(req, num_cached, num_new))
        self.waiting.extendleft(reversed(deferred))
        self.waiting.extendleft(reversed(skipped))  # they keep their places at the head

    def _prompt_hashes(self, req: Request) -> list:
        """Hashes of the request's full prompt blocks."""
        hashes = self.block_manager.block_hashes(req.req_id, req.all_token_ids, req.cache_extra, req.block_hashes)
        return hashes[:req.num_prompt_tokens // self.block_manager.block_size]

    def _blocks_computed_in_step(self, req: Request, start: int, num_new: int) -> dict:
        """The request's full prompt blocks that tokens [start, start + num_new) complete, by hash."""
        bs = self.block_manager.block_size
        hashes = self._prompt_hashes(req)
        blocks = self.block_manager.get_blocks(req.req_id)
        return {hashes[i]: blocks[i] for i in range(start // bs, min((start + num_new) // bs, len(hashes)))}

    def _blocks_being_computed(self) -> set:
        """Hashes of the prompt blocks that running requests have still to compute. A waiting
        request whose next block is one of them is held back (vLLM v1 would compute the block
        twice, once per request): the next steps find it cached and compute only the rest, so
        requests that share a prefix and arrive together compute it once."""
        bs = self.block_manager.block_size
        return {h for r in self.running if r.status == RequestStatus.RUNNING and r.blend is None
                and r.num_computed_tokens < r.num_prompt_tokens
                for h in self._prompt_hashes(r)[r.num_computed_tokens // bs:]}

    def _start_kv_load(self, req: Request, num_hit_tokens: int, num_ext: int, plan: BlendPlan | None) -> None:
        """The connector loads the request's external blocks and places its chunks; it waits."""
        req.status = RequestStatus.WAITING_FOR_KV
        req.num_computed_tokens = num_hit_tokens
        req.kv.num_loading_tokens = num_hit_tokens + num_ext
        req.blend = plan
        self.connector.update_state_after_alloc(req, num_hit_tokens, num_ext, plan)

    def _piece_cost(self, piece: BlendPiece) -> int:
        n, layers = len(piece.positions), self.config.num_layers
        if piece.score_layer is None or not layers:
            return n
        return math.ceil(n * (piece.score_layer + 1) / layers)

    def _long_cap(self, num_left: int, batch: _Batch) -> int:
        """The tokens a prompt with `num_left` to compute may take this step: all of them when it is
        short; when it is long and the step has room for another long prompt (then counted in the
        step), `long_prefill_chunk_tokens` (or the threshold), and at most what the short prompts'
        prefill tokens leave of the threshold with `prioritize_short_prefills` (at least one); else 0."""
        threshold = self.config.long_prefill_token_threshold
        if not threshold or num_left <= threshold or not self.config.enable_chunked_prefill:
            return num_left
        if batch.hold_long or batch.num_long >= self.config.max_long_partial_prefills:
            return 0
        batch.num_long += 1
        return max(1, min(self.config.long_prefill_chunk_tokens or threshold, threshold - batch.short_prefill))

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

    def _preempt(self, req: Request, batch: _Batch) -> int:
        """Preempt by recompute; returns the budget given back if it was already scheduled."""
        logger.debug("preempting %s (%d tokens computed)", req.req_id, req.num_computed_tokens)
        batch.preempted.append(req.req_id)
        given_back = batch.drop(req)
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.blend = None  # planned again at re-admission
        req.chunks.num_exact_tokens = None
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        return given_back

    def _build_output(self, batch: _Batch) -> SchedulerOutput:
        out = SchedulerOutput(preempted_req_ids=batch.preempted)
        items = sorted(batch.items, key=lambda it: not (it[1] == 1 and it[2] is None))  # decodes first
        cached = CachedRequestData()
        for req, n, piece in items:
            out.num_scheduled_tokens[req.req_id] = n
            if piece is not None:
                out.blend_pieces[req.req_id] = piece
            block_ids = self.block_manager.get_block_table(req.req_id)
            known = self._runner_blocks.get(req.req_id)
            if known is None:
                sampler_state = req.handoff.sampler_state if req.handoff is not None and not req.prefill_only else b""
                out.scheduled_new_reqs.append(NewRequestData(req.req_id, list(req.all_token_ids), block_ids,
                                                             req.num_computed_tokens, req.params,
                                                             req.num_prompt_tokens, req.num_prompt_logits,
                                                             sampler_state))
            else:
                cached.req_ids.append(req.req_id)
                cached.new_block_ids.append(block_ids[known:])
                cached.num_computed_tokens.append(req.num_computed_tokens)
            self._runner_blocks[req.req_id] = len(block_ids)
            self._runner_known.add(req.req_id)
        out.scheduled_cached_reqs = cached
        out.finished_req_ids, self._finished_req_ids = self._finished_req_ids, set()
        if self.connector is not None:
            out.kv_connector_metadata = self.connector.build_connector_meta()
        return out

    # ------------------------------------------------------------------ results

    def update_from_connector_output(self, out: KVConnectorOutput) -> None:
        """Apply what the connector finished: loaded requests run from where their KV ends."""
        if self.connector is None:
            return
        for req_id, result in self.connector.update_connector_output(out).items():
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.WAITING_FOR_KV:
                continue  # aborted or preempted while loading
            self._loaded(req, result)
        for key, _, ok in out.saved_chunks:
            if self.blender is not None:
                self.blender.stored(key, ok)

    def _loaded(self, req: Request, result: LoadResult) -> None:
        bs = self.block_manager.block_size
        loaded = min(req.num_computed_tokens + result.num_blocks * bs, req.kv.num_loading_tokens)
        for source, n in result.sources.items():
            self.connector.stats.hit_tokens[source] += n * bs
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = loaded
        plan = req.blend
        if plan is not None and not result.placed:
            logger.warning("request %s: chunk-caches could not be placed; computing them", req.req_id)
            plan = req.blend = None
        if plan is not None:
            if loaded < plan.start:
                plan.recompute_from(loaded)
            req.chunks.num_reused_tokens = plan.num_reused
            req.chunks.num_recomputed_tokens = plan.num_recomputed
            req.chunks.num_exact_tokens = plan.placed[0].start
            loaded = plan.start
            if plan.ready:  # nothing to recompute: the request goes on from the blend's end
                req.blend = None
                loaded = plan.end
        req.num_computed_tokens = loaded
        req.status = RequestStatus.RUNNING

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int],
                           blend_scores: dict[str, list[float]] | None = None) -> list[Request]:
        """Apply one step's results (sampled tokens, and the scores of blends' scoring passes);
        return the requests that got a new token."""
        updated = []
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted during the step
            piece = out.blend_pieces.get(req_id)
            if piece is not None and piece.score_layer is not None:  # the selection is made now
                req.blend.apply_scores(blend_scores[req_id])
                req.chunks.num_recomputed_tokens = req.blend.num_recomputed
                continue
            if piece is not None:  # a blend piece: the request moves on once all have run
                if not req.blend.done:
                    continue
                req.num_computed_tokens = req.blend.end
                req.blend = None
            else:
                req.num_computed_tokens += n
            self._cache_blocks(req)
            if req_id in sampled:
                req.append_output_token(sampled[req_id])
                updated.append(req)
        return updated

    def _cache_blocks(self, req: Request) -> None:
        exact = req.num_computed_tokens if req.chunks.num_exact_tokens is None else \
            min(req.num_computed_tokens, req.chunks.num_exact_tokens)
        cached = self.block_manager.cache_full_blocks(req.req_id, req.all_token_ids, exact, req.cache_extra)
        if cached and self.connector is not None:
            self.connector.on_blocks_cached(cached)
        if req.chunk_spans and not req.chunks.stored and req.num_computed_tokens >= req.num_prompt_tokens:
            req.chunks.stored = True
            if self.blender is not None:
                self._store_new_chunks(req)

    def _store_new_chunks(self, req: Request) -> None:
        decision = self.blender.new_chunks(req)
        for save in decision.saves:
            self.connector.save_chunk(req, save)
        for i in decision.requests:
            tokens, span = chunk_request_tokens(req.prompt_token_ids, req.chunk_spans, i)
            self.add_request(Request(f"chunk-cache-{next(self._chunk_ids)}", tokens,
                                     SamplingParams(max_tokens=1, temperature=0.0), cache_extra=req.cache_extra,
                                     arrival_time=req.arrival_time, chunk_spans=[span], internal=True))

    def finish(self, req_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request and free its blocks; None when unknown or done."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self._release(req)
        if req_id in self._runner_known:
            self._runner_known.discard(req_id)
            self._finished_req_ids.add(req_id)
        if req.internal and status == RequestStatus.FINISHED_ABORTED and self.blender is not None:
            self.blender.forget(req)
        if self.connector is not None:
            self.connector.request_finished(req_id)
        return req

    def _release(self, req: Request) -> None:
        """Free the request's blocks (preemption or end); the runner forgets its blocks."""
        self.block_manager.free(req.req_id)
        self._runner_blocks.pop(req.req_id, None)
