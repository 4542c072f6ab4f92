"""Chunk-cache reuse inside the engine: plan, place, recompute a sample, correct the rest.

A request's reusable chunks (`Request.chunk_spans`) whose chunk-caches were staged before admission
(`Request.chunk_staged`, by the KV prefetcher) are blended into its KV instead of being computed:
1. plan (`plan_blend`): after the request's cached prefix, every staged chunk is placed; the
   positions to compute are the text between and after the chunks up to the last placed one,
   every token of chunks without a cache, and of each placed chunk a sample: its first
   `CHUNK_START_TOKENS` tokens (they lost the context before them most) and evenly spaced tokens
   for the rest of the chunk's budget (`chunk_recompute_ratio`);
2. place (`place_chunks`): each cache is copied into the request's blocks with its keys re-rotated
   to the chunk's new position (RoPE by the position delta, `chunk_reuse.rotate_keys_`);
3. recompute: the positions run through every layer as sparse prefill pieces (each attends to
   every position up to its own), batched with the other requests' work;
4. correct (`ChunkCorrection`): at every layer, the sampled tokens' fresh K and V are compared with
   their cached K and V; each chunk's mean deviation (per KV head, keys un-rotated) is added to the
   chunk's other tokens before attention runs. The deviation of a reused chunk from a full prefill
   is dense and has a large shared part (attention to documents it did not see when cached), which
   a sparse recompute alone cannot fix and this dense, nearly free correction does.
The rest of the prompt (e.g. the question) is then computed as usual. Chunks computed for the first
time are stored (`chunk_caches_to_store`) re-based to position 0, under the chunk's hash.
With every token selected this is exactly a full prefill (tests).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvstore.chunks import load_chunk, store_chunk
from kvstore.keys import chunk_block_keys, chunk_hash
from worker.chunk_reuse import rotate_keys_
from worker.model import rope_inv_freq
from worker.request import Request
from kvweave.sampling_params import SamplingParams

CHUNK_START_TOKENS = 4
"""Leading tokens of every placed chunk that are always recomputed."""
CHUNK_CACHE_MODES = ("standalone", "in_context")
"""How a first-seen chunk gets its cache: computed on its own after the prompt's leading text
(one extra prefill of the chunk; reused with the dense correction), or its KV in the prompt it came
in, re-based (free; reused without the correction, which measured worse on such caches)."""


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, H, D] (half-split layout) by per-row angles given as cos/sin [T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@dataclass
class _Group:
    sample_rows: torch.Tensor
    """Rows (within the piece) of the chunk's sampled tokens used to estimate its deviation."""
    other_slots: torch.Tensor
    other_cos: torch.Tensor
    other_sin: torch.Tensor


class ChunkCorrection:
    """The dense correction of one sparse prefill piece (see the module docstring), applied by the
    attention backend at every layer before the piece's fresh KV is written."""

    def __init__(self, groups: list[_Group], cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.groups, self.cos, self.sin = groups, cos, sin
        """cos/sin [T, D/2] of the piece's positions (to un-rotate the key deviations)."""

    def apply(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> None:
        """k, v [T, H, D]: the piece's fresh KV at this layer; slots [T]: where it goes."""
        old_k = k_cache.index_select(1, slots).transpose(0, 1).float()
        old_v = v_cache.index_select(1, slots).transpose(0, 1).float()
        dk = rope_rotate(k.float() - old_k, self.cos, -self.sin)  # back to position 0
        dv = v.float() - old_v
        for g in self.groups:
            mk, mv = dk[g.sample_rows].mean(0), dv[g.sample_rows].mean(0)  # [H, D]
            n = g.other_slots.numel()
            add_k = rope_rotate(mk.expand(n, -1, -1), g.other_cos, g.other_sin)
            k_cache.index_add_(1, g.other_slots, add_k.transpose(0, 1).to(k_cache.dtype))
            v_cache.index_add_(1, g.other_slots, mv.expand(n, -1, -1).transpose(0, 1).to(v_cache.dtype))


@dataclass
class PlacedChunk:
    index: int
    start: int
    kv: torch.Tensor
    """[2, L, H, n, D], keys rotated for positions 0..n-1."""
    selected: list[int]
    """Offsets within the chunk recomputed in place."""


@dataclass
class BlendPlan:
    positions: list[int]
    """Every position computed in the blend, sorted."""
    end: int
    """The blend covers [start, end): the request continues normally from there."""
    placed: list[PlacedChunk]
    pieces: list[tuple[int, int]] = field(default_factory=list)
    """[lo, hi) ranges of `positions`, one per scheduled piece (a placed chunk's sample stays in one)."""
    next_piece: int = 0

    @property
    def num_reused(self) -> int:
        return sum(p.kv.shape[3] for p in self.placed)

    @property
    def num_recomputed(self) -> int:
        return sum(len(p.selected) for p in self.placed)


def select_offsets(n: int, ratio: float) -> list[int]:
    """The chunk's first CHUNK_START_TOKENS tokens, then evenly spaced ones up to ratio x n in all."""
    if ratio <= 0:
        return []
    k = min(n, max(CHUNK_START_TOKENS, math.ceil(ratio * n)))
    head = list(range(min(n, CHUNK_START_TOKENS)))
    rest = k - len(head)
    if rest <= 0 or n <= len(head):
        return head
    step = (n - len(head)) / rest
    return head + sorted({len(head) + int(i * step + step / 2) for i in range(rest)})


def plan_blend(spans: list[tuple[int, int]], staged: dict[int, torch.Tensor], start: int, num_tokens: int,
               ratio: float, piece_tokens: int,
               select: Callable[[int, float], list[int]] = select_offsets) -> BlendPlan | None:
    """The blend of the staged chunks that lie after `start` (tokens already cached), or None.
    `select(n, ratio)`: the offsets recomputed in a chunk of n tokens."""
    placed = [PlacedChunk(i, s, staged[i], select(n, ratio))
              for i, (s, n) in enumerate(spans) if i in staged and s >= start and staged[i].shape[3] == n]
    if not placed:
        return None
    last = placed[-1]
    end = last.start + last.kv.shape[3]
    reused = set()
    for p in placed:
        reused.update(range(p.start, p.start + p.kv.shape[3]))
        reused.difference_update(p.start + o for o in p.selected)
    positions = [q for q in range(start, end) if q not in reused]
    if end == num_tokens and (not positions or positions[-1] != end - 1):  # ends in a chunk: its logits
        positions.append(end - 1)
    plan = BlendPlan(positions, end, placed)
    _add_pieces(plan, 0, piece_tokens)
    return plan


def _add_pieces(plan: BlendPlan, lo: int, piece_tokens: int) -> None:
    """Pieces of about `piece_tokens` over plan.positions[lo:], cut only outside a placed chunk
    (its sample feeds one correction). No positions: nothing to run, the request goes on from `end`."""
    positions = plan.positions
    chunk_of = {p.start + o: p.index for p in plan.placed for o in p.selected}
    for hi in range(lo + 1, len(positions) + 1):
        at_end = hi == len(positions)
        inside = not at_end and chunk_of.get(positions[hi - 1]) is not None and \
            chunk_of.get(positions[hi - 1]) == chunk_of.get(positions[hi])
        if at_end or (hi - lo >= piece_tokens and not inside):
            plan.pieces.append((lo, hi))
            lo = hi


def place_chunks(kv_cache: torch.Tensor, plan: BlendPlan, slots_of, inv_freq: torch.Tensor) -> None:
    """Copy the placed chunk-caches into the request's slots, keys re-rotated to their positions."""
    for p in plan.placed:
        n = p.kv.shape[3]
        kv = p.kv.to(kv_cache.dtype, copy=True)
        rotate_keys_(kv[0], p.start, inv_freq)
        kv_cache[:, :, :, slots_of(torch.arange(p.start, p.start + n))] = kv


def piece_correction(plan: BlendPlan, lo: int, hi: int, slots_of, cos_table: torch.Tensor,
                     sin_table: torch.Tensor) -> ChunkCorrection | None:
    """The correction of piece [lo, hi) of the plan: one group per placed chunk sampled in it."""
    positions = plan.positions[lo:hi]
    row = {q: r for r, q in enumerate(positions)}
    groups = []
    for p in plan.placed:
        n = p.kv.shape[3]
        rows = [row[p.start + o] for o in p.selected if o >= CHUNK_START_TOKENS and p.start + o in row]
        if not rows:
            continue
        chosen = set(p.selected)
        others = torch.tensor([p.start + o for o in range(n) if o not in chosen], dtype=torch.long)
        if not others.numel():
            continue
        groups.append(_Group(torch.tensor(rows), slots_of(others), cos_table[others], sin_table[others]))
    if not groups:
        return None
    pos = torch.tensor(positions)
    return ChunkCorrection(groups, cos_table[pos], sin_table[pos])


def chunk_caches_to_store(kv_cache: torch.Tensor, spans: list[tuple[int, int]], skip: set[int], slots_of,
                          inv_freq: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(chunk index, KV [2, L, H, n, D] re-based to position 0) of the chunks computed in context."""
    out = []
    for i, (s, n) in enumerate(spans):
        if i in skip:
            continue
        kv = kv_cache[:, :, :, slots_of(torch.arange(s, s + n))].clone()
        rotate_keys_(kv[0], -s, inv_freq)
        out.append((i, kv))
    return out


def stage_local_chunks(store, req, block_size: int) -> int:
    """Stage on the request the chunk-caches the local store holds (any host tier); returns how many."""
    req.chunks_looked_up = True
    if store is None:
        return 0
    found = 0
    for i, (s, n) in enumerate(req.chunk_spans):
        if i in req.chunk_staged:
            continue
        kv = load_chunk(store, chunk_hash(req.prompt_token_ids[s:s + n], req.cache_extra), n, block_size)
        if kv is not None:
            req.chunk_staged[i] = kv
            found += 1
    return found


class ChunkBlender:
    """The scheduler's side of chunk reuse: plans a request's blend at admission, places its
    chunk-caches, hands out its pieces with their corrections, and stores the chunks it computed."""

    def __init__(self, kv_cache: torch.Tensor, block_manager, model, store=None, ratio: float = 0.08,
                 piece_tokens: int = 512, correct: bool = True, mode: str = "standalone", submit=None) -> None:
        """`mode`: how first-seen chunks get their cache (CHUNK_CACHE_MODES); `submit(request)` queues
        an engine-made request (standalone mode computes each new chunk with one)."""
        if mode not in CHUNK_CACHE_MODES:
            raise ValueError(f"unknown chunk cache mode {mode!r}; valid: {', '.join(CHUNK_CACHE_MODES)}")
        self.kv_cache, self.bm, self.store = kv_cache, block_manager, store
        self.ratio, self.piece_tokens, self.mode, self.submit = ratio, piece_tokens, mode, submit
        self.correct = correct and mode == "standalone"
        self.inv_freq = rope_inv_freq(model.args)
        self.cos, self.sin = model.rope_cos, model.rope_sin
        self.num_stored = 0
        self.pending: set[bytes] = set()
        """Keys of chunks an engine-made request is computing."""
        self._request_ids = itertools.count(1)

    def slots_of(self, req):
        bs = self.bm.block_size
        bt = torch.tensor(self.bm.get_block_table(req.req_id), dtype=torch.long)
        return lambda pos: bt[pos // bs] * bs + pos % bs

    def plan(self, req, start: int) -> BlendPlan | None:
        if not req.chunk_staged:
            return None
        return plan_blend(req.chunk_spans, req.chunk_staged, start, req.num_prompt_tokens, self.ratio,
                          self.piece_tokens)

    def admit(self, req, plan: BlendPlan) -> None:
        place_chunks(self.kv_cache, plan, self.slots_of(req), self.inv_freq)
        req.blend = plan
        req.num_chunk_reused_tokens = plan.num_reused
        req.num_recomputed_tokens = plan.num_recomputed
        req.num_exact_tokens = plan.placed[0].start

    def next_piece(self, req) -> tuple[list[int], ChunkCorrection | None, bool]:
        """(positions, correction, last piece) of the request's next blend piece."""
        plan = req.blend
        lo, hi = plan.pieces[plan.next_piece]
        corr = piece_correction(plan, lo, hi, self.slots_of(req), self.cos, self.sin) if self.correct else None
        return plan.positions[lo:hi], corr, plan.next_piece == len(plan.pieces) - 1

    def store_new_chunks(self, req) -> None:
        """Once a request's prompt is computed: keep the caches of the chunks it had none for. In
        `in_context` mode (and for the engine's own chunk requests) they are its KV re-based to
        position 0; in `standalone` mode each is computed by an engine-made request of the prompt's
        leading text (before its first chunk, usually cached) followed by the chunk alone."""
        if self.store is None or not req.chunk_spans:
            return
        bs = self.bm.block_size
        keys = {i: chunk_hash(req.prompt_token_ids[s:s + n], req.cache_extra)
                for i, (s, n) in enumerate(req.chunk_spans) if i not in req.chunk_staged}
        held = {i for i, key in keys.items()
                if self.store.contains(chunk_block_keys(key, req.chunk_spans[i][1], bs)[0])}
        if self.mode == "standalone" and not req.internal:
            for i, key in keys.items():
                if i not in held and key not in self.pending and self.submit is not None:
                    self.pending.add(key)
                    self.submit(self._chunk_request(req, i))
            return
        for i, kv in chunk_caches_to_store(self.kv_cache, req.chunk_spans, set(req.chunk_staged) | held,
                                           self.slots_of(req), self.inv_freq):
            n = req.chunk_spans[i][1]
            key = keys[i]
            self.pending.discard(key)
            if store_chunk(self.store, key, kv, self.bm.block_size, cost=float(n)):
                self.num_stored += 1

    def _chunk_request(self, req, i: int):
        s, n = req.chunk_spans[i]
        lead = req.prompt_token_ids[:req.chunk_spans[0][0]]
        return Request(f"chunk-cache-{next(self._request_ids)}", [*lead, *req.prompt_token_ids[s:s + n]],
                       SamplingParams(max_tokens=1, temperature=0.0), cache_extra=req.cache_extra,
                       arrival_time=req.arrival_time, chunk_spans=[(len(lead), n)], internal=True)

    def forget(self, req) -> None:
        """An engine-made chunk request ended without storing (aborted): its chunk may be asked again."""
        for s, n in req.chunk_spans:
            self.pending.discard(chunk_hash(req.prompt_token_ids[s:s + n], req.cache_extra))
