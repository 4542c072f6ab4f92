"""Chunk-cache reuse, the scheduler's side: which chunks to place, which tokens to recompute, in
which pieces, and which chunks to store. Plain data only; the KV moves in the KV connector's
worker side and the runner (worker/chunk_kv.py holds the tensor operations).

A request's reusable chunks (`Request.chunk_spans`) whose chunk-caches were staged before admission
(`Request.kv.staged_chunks`) are blended into its KV instead of being computed:
1. plan (`plan_blend`): after the request's cached prefix, every staged chunk is placed; the
   positions to compute are the text between and after the chunks up to the last placed one,
   every token of chunks without a cache, and of each placed chunk a sample: its first
   `CHUNK_START_TOKENS` tokens (they lost the context before them most) and evenly spaced tokens
   for the rest of the chunk's budget (`chunk_recompute_ratio`);
2. place: the connector copies each cache into the request's blocks with its keys re-rotated to
   the chunk's new position (RoPE by the position delta);
3. recompute: the positions run through every layer as sparse prefill pieces (each attends to
   every position up to its own), batched with the other requests' work under the step's token
   budget (`next_piece`; a piece is never cut inside a chunk's sample, which feeds one correction);
4. correct: at every layer, the sampled tokens' fresh K and V are compared with their cached K and
   V; each chunk's mean deviation (per KV head, keys un-rotated) is added to the chunk's other
   tokens before attention runs (`CorrectionGroup`, applied by worker/chunk_kv.py). The deviation
   of a reused chunk from a full prefill is dense and has a large shared part (attention to
   documents it did not see when cached), which a sparse recompute alone cannot fix and this
   dense, nearly free correction does.
Which tokens a placed chunk recomputes (`CHUNK_SELECTIONS`): `kvweave` (above: chunk starts and an
even sample, corrected), `chunk_start` (as many tokens, all from the chunk's start) or `deviation`
(CacheBlend's: a first pass runs every reused token through layers 0..DEVIATION_LAYER, and the
`chunk_recompute_ratio` share of them whose values moved most there from the cached ones are
recomputed; their early layers are fresh already).
The rest of the prompt (e.g. the question) is then computed as usual. Chunks computed for the first
time are stored re-based to position 0, under the chunk's hash: in `standalone` mode each is
computed on its own by an engine-made request (`chunk_request_tokens`), in `in_context` mode its KV
in the prompt it came in is kept. With every token selected a blend is exactly a full prefill (tests).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.keys import chunk_block_keys, chunk_hash
from kvweave.defaults import CHUNK_RECOMPUTE_RATIO

CHUNK_START_TOKENS = 4
"""Leading tokens of every placed chunk that are always recomputed."""
CHUNK_SELECTIONS = ("kvweave", "chunk_start", "deviation")
"""Which tokens of a placed chunk are recomputed (see the module docstring)."""
DEVIATION_LAYER = 1
"""The layer whose value deviation ranks tokens in the `deviation` selection (CacheBlend's choice)."""
CHUNK_CACHE_MODES = ("standalone", "in_context")
"""How a first-seen chunk gets its cache: computed on its own after the prompt's leading text
(one extra prefill of the chunk; reused with the dense correction), or its KV in the prompt it came
in, re-based (free; reused without the correction, which measured worse on such caches)."""


@dataclass(slots=True)
class PlacedChunk:
    index: int
    """Index of the chunk in the request's chunk spans."""
    start: int
    num_tokens: int
    selected: list[int]
    """Offsets within the chunk recomputed in place."""


@dataclass(slots=True)
class CorrectionGroup:
    """One placed chunk's correction inside a piece (see the module docstring)."""

    sample_rows: list[int]
    """Rows (within the piece) of the chunk's sampled tokens that estimate its deviation."""
    other_positions: list[int]
    """Positions of the chunk's tokens that keep their cached KV and receive the correction."""


@dataclass(slots=True)
class BlendPiece:
    """One scheduled piece of a blend: sparse positions, attended per position."""

    positions: list[int]
    groups: list[CorrectionGroup]
    sample: bool
    """The piece ends the prompt: sample the next token."""
    score_layer: int | None = None
    """A scoring pass (`deviation` selection): run the positions through layers 0..score_layer only
    and return each one's value deviation at that layer."""


@dataclass
class BlendPlan:
    positions: list[int]
    """Every position computed in the blend, sorted."""
    start: int
    """Tokens cached before the blend."""
    end: int
    """The blend covers [start, end): the request continues normally from there."""
    placed: list[PlacedChunk]
    ends_prompt: bool = False
    """`end` is the end of the prompt (the last piece samples)."""
    correct: bool = True
    """Apply the dense correction (standalone chunk-caches)."""
    score_ratio: float | None = None
    """`deviation` selection: the share of reused tokens to recompute, chosen by a scoring pass
    that has not run yet (None: the selection is made)."""
    cursor: int = 0
    """Positions before this index have been scheduled."""
    num_pieces: int = 0

    @property
    def num_reused(self) -> int:
        return sum(p.num_tokens for p in self.placed)

    @property
    def num_recomputed(self) -> int:
        return sum(len(p.selected) for p in self.placed)

    @property
    def done(self) -> bool:
        return self.score_ratio is None and self.cursor >= len(self.positions)

    def reused_positions(self) -> list[int]:
        return [p.start + o for p in self.placed for o in range(p.num_tokens)]

    def apply_scores(self, scores: list[float]) -> None:
        """`deviation` selection: recompute the reused tokens that moved most (`scores` follows
        `reused_positions`)."""
        reused = self.reused_positions()
        k = min(len(reused), round(self.score_ratio * len(reused)))
        chosen = set(sorted(range(len(reused)), key=lambda i: -scores[i])[:k])
        at = 0
        for p in self.placed:
            p.selected = [o for o in range(p.num_tokens) if at + o in chosen]
            at += p.num_tokens
        self.positions = sorted(set(self.positions) | {reused[i] for i in chosen})
        self.score_ratio = None

    @property
    def ready(self) -> bool:
        """Nothing left to compute before `end` (the request goes on from there)."""
        return self.score_ratio is None and not self.positions

    def recompute_from(self, loaded: int) -> None:
        """Also compute [loaded, start): the prefix load before the blend came up short."""
        assert self.cursor == 0 and loaded <= self.start
        self.positions[:0] = range(loaded, self.start)
        self.start = loaded


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


def chunk_start_offsets(n: int, ratio: float) -> list[int]:
    """As many tokens as `select_offsets` picks, all from the chunk's start."""
    return list(range(len(select_offsets(n, ratio))))


SELECTORS: dict[str, Callable[[int, float], list[int]]] = {
    "kvweave": select_offsets, "chunk_start": chunk_start_offsets, "deviation": lambda n, ratio: []}


def plan_blend(spans: list[tuple[int, int]], staged: set[int], start: int, num_tokens: int, ratio: float,
               correct: bool = True, selection: str = "kvweave") -> BlendPlan | None:
    """The blend of the staged chunks that lie after `start` (tokens already cached), or None."""
    select = SELECTORS[selection]
    placed = [PlacedChunk(i, s, n, select(n, ratio)) for i, (s, n) in enumerate(spans) if i in staged and s >= start]
    if not placed:
        return None
    last = placed[-1]
    end = last.start + last.num_tokens
    reused = set()
    for p in placed:
        reused.update(range(p.start, p.start + p.num_tokens))
        reused.difference_update(p.start + o for o in p.selected)
    positions = [q for q in range(start, end) if q not in reused]
    if end == num_tokens and (not positions or positions[-1] != end - 1):  # ends in a chunk: its logits
        positions.append(end - 1)
    return BlendPlan(positions, start, end, placed, ends_prompt=end == num_tokens, correct=correct,
                     score_ratio=ratio if selection == "deviation" and ratio > 0 else None)


def next_piece(plan: BlendPlan, budget: int, alone: bool) -> BlendPiece | None:
    """The next piece of at most `budget` positions, cut only outside a placed chunk's sample; None
    when the smallest such piece does not fit, unless `alone` (nothing else runs this step: a piece
    larger than the whole step budget still has to run)."""
    if plan.score_ratio is not None:
        return BlendPiece(plan.reused_positions(), [], False, score_layer=DEVIATION_LAYER)
    positions, lo = plan.positions, plan.cursor
    if lo >= len(positions):
        return None
    chunk_of = {p.start + o: p.index for p in plan.placed for o in p.selected}
    hi, best = lo, None
    while hi < len(positions):
        hi += 1
        inside = hi < len(positions) and chunk_of.get(positions[hi - 1]) is not None and \
            chunk_of.get(positions[hi - 1]) == chunk_of.get(positions[hi])
        if inside:
            continue
        if hi - lo > budget:
            break
        best = hi
    if best is None:
        if not alone:
            return None
        best = hi
    plan.cursor = best
    plan.num_pieces += 1
    piece = positions[lo:best]
    groups = correction_groups(plan, piece) if plan.correct else []
    return BlendPiece(piece, groups, plan.ends_prompt and best == len(positions))


def correction_groups(plan: BlendPlan, piece: list[int]) -> list[CorrectionGroup]:
    """One group per placed chunk sampled (past its head) in the piece."""
    row = {q: r for r, q in enumerate(piece)}
    groups = []
    for p in plan.placed:
        rows = [row[p.start + o] for o in p.selected if o >= CHUNK_START_TOKENS and p.start + o in row]
        if not rows:
            continue
        chosen = set(p.selected)
        others = [p.start + o for o in range(p.num_tokens) if o not in chosen]
        if others:
            groups.append(CorrectionGroup(rows, others))
    return groups


def chunk_request_tokens(prompt_token_ids: list[int], spans: list[tuple[int, int]], i: int
                         ) -> tuple[list[int], tuple[int, int]]:
    """A standalone chunk-cache's request: the prompt's leading text (before its first chunk, usually
    a cached instruction) then chunk i alone; returns its tokens and the chunk's span in them."""
    s, n = spans[i]
    lead = prompt_token_ids[:spans[0][0]]
    return [*lead, *prompt_token_ids[s:s + n]], (len(lead), n)


@dataclass
class ChunkSave:
    """A chunk computed in a request's context whose KV is to be stored, re-based to position 0."""

    key: bytes
    start: int
    num_tokens: int


@dataclass
class ChunkDecision:
    """What to do with the chunks a request computed itself (`ChunkBlender.new_chunks`)."""

    saves: list[ChunkSave] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    """Chunk indexes to compute with a standalone engine-made request each."""


class ChunkBlender:
    """Plans each request's blend at admission and decides what happens to the chunks it computed."""

    def __init__(self, block_size: int, ratio: float = CHUNK_RECOMPUTE_RATIO, correct: bool = True, mode: str = "standalone",
                 store_contains: Callable[[bytes], bool] | None = None, selection: str = "kvweave") -> None:
        """`store_contains(key)`: whether the local host tiers hold an entry (None: no host tiers,
        so no chunk is ever stored)."""
        if mode not in CHUNK_CACHE_MODES:
            raise ValueError(f"unknown chunk cache mode {mode!r}; valid: {', '.join(CHUNK_CACHE_MODES)}")
        if selection not in CHUNK_SELECTIONS:
            raise ValueError(f"unknown chunk selection {selection!r}; valid: {', '.join(CHUNK_SELECTIONS)}")
        self.block_size, self.ratio, self.mode, self.selection = block_size, ratio, mode, selection
        self.correct = correct and mode == "standalone"
        self.store_contains = store_contains
        self.num_stored = 0
        """Chunk-caches stored so far (counted when their save finishes)."""
        self.pending: set[bytes] = set()
        """Keys of chunks an engine-made request is computing."""

    def plan(self, req, start: int) -> BlendPlan | None:
        if not req.kv.staged_chunks:
            return None
        return plan_blend(req.chunk_spans, req.kv.staged_chunks, start, req.num_prompt_tokens, self.ratio,
                          self.correct, self.selection)

    def new_chunks(self, req) -> ChunkDecision:
        """Once a request's prompt is computed: keep the caches of the chunks it had none for. In
        `in_context` mode (and for the engine's own chunk requests) they are its KV re-based to
        position 0; in `standalone` mode each is computed by an engine-made request."""
        out = ChunkDecision()
        if self.store_contains is None or not req.chunk_spans:
            return out
        bs = self.block_size
        for i, (s, n) in enumerate(req.chunk_spans):
            if i in req.kv.staged_chunks:
                continue
            key = chunk_hash(req.prompt_token_ids[s:s + n], req.cache_extra)
            if self.store_contains(chunk_block_keys(key, n, bs)[0]):
                continue
            if self.mode == "standalone" and not req.internal:
                if key not in self.pending:
                    self.pending.add(key)
                    out.requests.append(i)
            else:
                out.saves.append(ChunkSave(key, s, n))
        return out

    def stored(self, key: bytes, ok: bool) -> None:
        """A chunk save finished (ok: the store kept it)."""
        self.pending.discard(key)
        self.num_stored += ok

    def forget(self, req) -> None:
        """An engine-made chunk request ended without storing (aborted): its chunk may be asked again."""
        for s, n in req.chunk_spans:
            self.pending.discard(chunk_hash(req.prompt_token_ids[s:s + n], req.cache_extra))
