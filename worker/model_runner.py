"""Model runner: turns a SchedulerOutput into batch tensors, runs the forward, samples.

It holds the model, the KV cache and its own copy of each scheduled request's state (tokens, block
table, sampling parameters, seeded generator), updated from the scheduler's diffs as in vLLM v1,
and never decides policy. A step's int64 inputs (token ids, positions, slot mapping, block tables,
context lengths) are written into one persistent host buffer and reach the device in one copy
(none on the CPU).

Under tensor parallelism (worker/tp_executor.py) every rank of a worker has a runner over its
shard of the model and its heads of the KV cache, and runs every step the leader scheduled; only
the leader's runner samples, and the others append the tokens it sampled (`apply_sampled`). Steps
of at least `TPOptions.overlap_min_tokens` tokens run in two halves whose all-reduces overlap
(worker/token_split.py).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worker.attention import AttentionMetadata, PagedAttention, PrefillSeq, attention_backend, kv_cache_shape
from worker.chunk_blend import BlendPiece
from worker.chunk_kv import ChunkCorrection
from worker.cuda_graphs import DecodeGraphs, GraphMode, graph_mode
from worker.model import Transformer, rope_attention_factor
from kvweave.sampling_params import SamplingParams
from worker.sampling import SampleResult, merge_rows, row_problem, sample
from worker.scheduler_output import SchedulerOutput
from worker.step_profile import StepProfile
from worker.tensor_parallel import all_reduce, first_kv_head
from worker.token_split import forward_overlapped, split_items

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, int]
    logprobs: dict[str, tuple[float, dict[int, float]]]
    prompt_logits: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)
    """Requests that asked for prompt logits: (positions, float32 logits [n, vocab] on the host)."""
    blend_scores: dict[str, list[float]] = field(default_factory=dict)
    """Blends' scoring passes: the deviation of each position of the piece."""
    failed: dict[str, str] = field(default_factory=dict)
    """Requests whose token could not be sampled this step (the others are unaffected): the reason."""


@dataclass(frozen=True, slots=True)
class TPRank:
    """This runner's place in a tensor-parallel group."""
    group: object
    rank: int
    size: int
    overlap_min_tokens: int | None
    """Steps of at least this many tokens run token-split (None: never)."""


@dataclass(slots=True)
class CachedRequestState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    prompt_logits: range = range(0)
    """Prompt positions whose logits are returned."""
    mm: Any = None
    """The prompt's image embeddings (worker.multimodal.MultimodalInputs), or None."""


class StepInputs:
    """A step's int64 inputs (token ids, positions, slot mapping, block tables, context lengths),
    packed into one persistent host buffer (pinned when the device is a GPU) and moved to the
    device in one copy; on the CPU the tensors are views of that buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = torch.empty(0, dtype=torch.long)
        self.arrays: list[np.ndarray] = []

    def add(self, array: np.ndarray) -> int:
        """Queue an int64 array; its tensor is `upload()[index]`."""
        self.arrays.append(array)
        return len(self.arrays) - 1

    def upload(self) -> list[torch.Tensor]:
        total = sum(a.size for a in self.arrays)
        if self.host.numel() < total:
            self.host = torch.empty(max(total, 2 * self.host.numel()), dtype=torch.long,
                                    pin_memory=self.device.type == "cuda")
        host, offset, spans = self.host.numpy(), 0, []
        for a in self.arrays:
            host[offset:offset + a.size] = a.ravel()
            spans.append((offset, a.shape))
            offset += a.size
        self.arrays = []
        dev = self.host[:total].to(self.device, non_blocking=True)
        return [dev[o:o + math.prod(shape)].view(shape) for o, shape in spans]


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", profile: StepProfile | None = None,
                 max_num_seqs: int = 128, kv_cache: torch.Tensor | None = None, tp: TPRank | None = None) -> None:
        """`kv_cache`: a cache to use instead of allocating one (a tensor-parallel group's, shared by its
        ranks: this rank attends over its own heads of it); `tp`: this runner's rank in its group."""
        self.model, self.block_size = model, block_size
        self.tp = tp
        self.profile = profile or StepProfile()
        """Times the prepare, forward and sample phases of each step."""
        self.device = torch.device(device)
        a = model.args
        mode = graph_mode(self.device) if tp is None else GraphMode.OFF  # a step's all-reduces are not captured
        # with decode graphs, one block more than the block manager hands out: the padding rows' scratch
        cache_blocks = num_blocks + (0 if mode is GraphMode.OFF else 1)
        if kv_cache is None:
            kv_cache = torch.zeros(kv_cache_shape(a.n_layers, cache_blocks, block_size, a.n_kv_heads, a.head_dim),
                                   dtype=model.dtype, device=self.device)
        self.kv_cache = kv_cache
        """The KV cache the connector moves blocks of (a group's whole cache under tensor parallelism)."""
        first = first_kv_head(tp.rank, tp.size, kv_cache.shape[2]) if tp and kv_cache.shape[2] > a.n_kv_heads else 0
        heads = slice(first, first + a.n_kv_heads)
        self.attn_cache = kv_cache[:, :, heads]
        """This rank's heads of it (each layer's slab stays contiguous: heads are the outer dim). Ranks
        that replicate a KV head write the same values into it."""
        self.graphs = None if mode is GraphMode.OFF else DecodeGraphs(
            model, self.kv_cache, block_size, num_blocks, a.max_seq_len, max_num_seqs, mode)
        """Decode-only steps replayed as CUDA graphs (worker/cuda_graphs.py)."""
        logger.info("KV cache: %d blocks of %d tokens, %.2f GiB on %s", num_blocks, block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**30, self.device)
        self.requests: dict[str, CachedRequestState] = {}
        self.generators: dict[str, torch.Generator] = {}
        """Seeded requests' generators, kept across preemption (dropped when the request finishes)."""
        self.broken: dict[str, str] = {}
        """Requests whose sampling parameters are out of range or whose sampling state could not be
        set up (a request built around the validation at the edges): they fail at their first
        sample, alone."""
        self._inputs = StepInputs(self.device)
        self._inputs_b = StepInputs(self.device)  # a token-split step's second half
        self.get_mm_inputs: Callable[[str], Any] = lambda req_id: None
        """A new request's image embeddings (the engine's lookup; they are not scheduler data)."""
        self._mm_parts: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []
        """The last prepared step's image positions: (rows of the step, rows of the embeddings, embeddings)."""
        self._logit_rows: dict[str, tuple[list[int], list[int]]] = {}
        m = rope_attention_factor(model.args)  # the tables carry yarn's factor; corrections need pure rotations
        self._rot_cos, self._rot_sin = (model.rope_cos, model.rope_sin) if m == 1 else \
            (model.rope_cos / m, model.rope_sin / m)

    # ------------------------------------------------------------------ state

    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
            self.generators.pop(req_id, None)
            self.broken.pop(req_id, None)
        for req_id in out.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            wanted = range(new.num_prompt_tokens - new.num_prompt_logits, new.num_prompt_tokens)
            self.requests[new.req_id] = CachedRequestState(list(new.token_ids), list(new.block_ids),
                                                           new.num_computed_tokens, new.params, wanted,
                                                           self.get_mm_inputs(new.req_id))
            problem = row_problem(new.params, self.model.args.vocab_size)  # once per request, not per step
            if problem is not None:
                self.broken[new.req_id] = problem
            if new.params.seed is not None and new.req_id not in self.generators and problem is None:
                try:
                    self.generators[new.req_id] = self._generator(new.params.seed, new.sampler_state)
                except (RuntimeError, ValueError, TypeError, OverflowError):
                    self.broken[new.req_id] = "invalid seed or sampler state"
        cached = out.scheduled_cached_reqs
        for req_id, block_ids, num_computed in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            state = self.requests[req_id]
            state.block_ids.extend(block_ids)
            state.num_computed_tokens = num_computed

    def _generator(self, seed: int, sampler_state: bytes) -> torch.Generator:
        generator = torch.Generator(self.device).manual_seed(seed)
        if sampler_state:  # continued from a prefill handoff
            generator.set_state(torch.frombuffer(bytearray(sampler_state), dtype=torch.uint8))
        return generator

    # ------------------------------------------------------------------ inputs

    def _positions(self, req_id: str, n: int, piece: BlendPiece | None) -> np.ndarray:
        if piece is not None:
            return np.asarray(piece.positions, dtype=np.int64)
        start = self.requests[req_id].num_computed_tokens
        return np.arange(start, start + n, dtype=np.int64)

    def _slots(self, block_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return block_ids[positions // self.block_size] * self.block_size + positions % self.block_size

    def _prepare_inputs(self, items: list[tuple[str, int, BlendPiece | None]], packed: StepInputs | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list]:
        """Inputs of a forward over `items` (request, tokens, blend piece), decodes first; returns
        (token ids, positions, attention metadata, row to sample per item or None). Every int64
        input of the step goes to the device in one copy (`StepInputs`: `packed`, default the runner's)."""
        packed = packed or self._inputs
        ids, pos, slots, tables, prefill_info, decode_rows, sample_rows = [], [], [], {}, [], [], []
        self._logit_rows, self._mm_parts = {}, []
        offset = 0
        for req_id, n, piece in items:
            state = self.requests[req_id]
            p = self._positions(req_id, n, piece)
            table = tables[req_id] = np.asarray(state.block_ids, dtype=np.int64)
            tokens = state.token_ids  # only the step's own tokens are converted (not the whole context)
            ids.append(np.asarray(tokens[int(p[0]):int(p[0]) + n] if piece is None else [tokens[q] for q in p.tolist()],
                                  dtype=np.int64))
            pos.append(p)
            slots.append(self._slots(table, p))
            if piece is None and n == 1:
                decode_rows.append((req_id, int(p[0]) + 1))
            else:
                prefill_info.append((req_id, offset, n, p, piece))
            if state.prompt_logits:
                self._want_logits(req_id, state.prompt_logits, p, offset)
            if state.mm is not None:
                self._want_images(state.mm, p, offset)
            sample = piece.sample if piece is not None else int(p[-1]) + 1 == len(state.token_ids)
            sample_rows.append(offset + n - 1 if sample else None)
            offset += n
        flat = [packed.add(np.concatenate(a)) for a in (ids, pos, slots)]
        prefill_arrays = [self._prefill_arrays(packed, tables[r], n, p, pc) for r, _, n, p, pc in prefill_info]
        decode_arrays = self._decode_arrays(packed, [tables[r] for r, _ in decode_rows], [c for _, c in decode_rows])
        dev = packed.upload()
        token_ids, positions, slot_mapping = (dev[i] for i in flat)
        meta = AttentionMetadata(slot_mapping, len(decode_rows), prefills=[
            self._prefill_seq(dev, arrays, tables[r], o, n, p, pc)
            for arrays, (r, o, n, p, pc) in zip(prefill_arrays, prefill_info)])
        if decode_rows:
            self._decode_metadata(meta, dev[decode_arrays[0]], dev[decode_arrays[1]], decode_arrays[2])
        return token_ids, positions, meta, sample_rows

    def _want_images(self, mm, p: np.ndarray, offset: int) -> None:
        """Rows of the step at image placeholder positions, and their embedding rows."""
        prompt = p < len(mm.rows)
        rows = np.full(len(p), -1, dtype=np.int64)
        rows[prompt] = mm.rows[p[prompt]]
        at = np.nonzero(rows >= 0)[0]
        if len(at):
            self._mm_parts.append((offset + at, rows[at], mm.embeds))

    def _input_embeds(self, token_ids: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings when it holds image positions (None: the token embeddings)."""
        if not self._mm_parts:
            return None
        vocab = self.model.args.vocab_size
        x = self.model.embed_tokens(torch.where(token_ids < vocab, token_ids, 0))
        for at, rows, embeds in self._mm_parts:
            x[torch.from_numpy(at).to(x.device)] = embeds[torch.from_numpy(rows).to(embeds.device)].to(x.dtype)
        return x

    def _want_logits(self, req_id: str, wanted: range, p: np.ndarray, offset: int) -> None:
        """Rows of the step whose logits the request asked for (its last prompt positions)."""
        rows = [(int(q), offset + i) for i, q in enumerate(p) if q in wanted]
        if rows:
            self._logit_rows[req_id] = ([q for q, _ in rows], [r for _, r in rows])

    def _prefill_arrays(self, packed: StepInputs, table: np.ndarray, n: int, p: np.ndarray,
                        piece: BlendPiece | None) -> tuple[int | None, int | None, int | None]:
        """Indexes in `packed` of a prefill's context slots, sparse positions and block table."""
        start = int(p[0])
        if piece is None:
            return (packed.add(self._slots(table, np.arange(start + n))) if start else None), None, None
        ctx = packed.add(self._slots(table, np.arange(int(p[-1]) + 1)))
        return ctx, packed.add(p), (packed.add(table) if piece.groups else None)

    def _prefill_seq(self, dev: list[torch.Tensor], arrays: tuple, table: np.ndarray, offset: int, n: int,
                     p: np.ndarray, piece: BlendPiece | None) -> PrefillSeq:
        ctx_i, pos_i, table_i = arrays
        ctx = dev[ctx_i] if ctx_i is not None else None
        if piece is None:
            return PrefillSeq(offset, n, int(p[0]), ctx)
        positions = dev[pos_i]
        if piece.score_layer is not None:
            return PrefillSeq(offset, n, int(p[0]), ctx, positions, score_layer=piece.score_layer)
        correction = None
        if piece.groups:
            device_table = dev[table_i]
            correction = ChunkCorrection(
                piece.groups, positions,
                lambda q: device_table[q // self.block_size] * self.block_size + q % self.block_size,
                self._rot_cos, self._rot_sin)
        return PrefillSeq(offset, n, int(p[0]), ctx, positions, correction)

    def _decode_arrays(self, packed: StepInputs, tables: list[np.ndarray], ctx_lens: list[int]
                       ) -> tuple[int, int, int] | None:
        """Indexes in `packed` of the decodes' padded block tables and context lengths, and the
        longest context."""
        if not tables:
            return None
        max_len = max(ctx_lens)
        max_blocks = -(-max_len // self.block_size)
        bt = np.zeros((len(tables), max_blocks), dtype=np.int64)
        for i, t in enumerate(tables):
            m = min(len(t), max_blocks)
            bt[i, :m] = t[:m]
        return packed.add(bt), packed.add(np.asarray(ctx_lens, dtype=np.int64)), max_len

    def _decode_metadata(self, meta: AttentionMetadata, block_tables: torch.Tensor, lens: torch.Tensor,
                         max_len: int) -> None:
        bs = self.block_size
        meta.decode_block_tables, meta.decode_context_lens, meta.decode_max_len = block_tables, lens, max_len
        if attention_backend(self.attn_cache) == "torch":  # the torch path gathers padded contexts
            ar = torch.arange(max_len, device=self.device)
            slots = (block_tables[:, :, None] * bs + torch.arange(bs, device=self.device)).view(len(lens), -1)
            pad = ar[None, :] >= lens[:, None]
            bias = torch.zeros(pad.shape, dtype=self.model.dtype, device=self.device).masked_fill_(pad, float("-inf"))
            meta.decode_slots, meta.decode_bias = slots[:, :max_len].contiguous(), bias[None, :, None, :]

    # ------------------------------------------------------------------ step

    def _score(self, req_id: str, piece: BlendPiece) -> list[float]:
        """A blend's scoring pass: its positions through layers 0..score_layer alone."""
        token_ids, positions, meta, _ = self._prepare_inputs([(req_id, len(piece.positions), piece)])
        backend = self._attention(meta)
        self.model(token_ids, positions, backend, num_layers=piece.score_layer + 1,
                   input_embeds=self._input_embeds(token_ids))
        scores = meta.prefills[0].scores
        if self.tp is not None:  # each rank's heads' share of the deviation
            all_reduce(scores, self.tp.group).wait()
        return scores.tolist()

    def _attention(self, meta: AttentionMetadata) -> PagedAttention:
        return PagedAttention(self.attn_cache, meta, self.model.args.n_heads, self.block_size,
                              fused_decode=self.tp is None)

    def _sample(self, req_ids: list[str], logits: torch.Tensor) -> tuple[SampleResult, dict[str, str]]:
        """One token per request (row of `logits`), and the requests that failed alone: the broken
        ones are left out of the batch, the sampler reports the rest (worker/sampling.py)."""
        failed = {r: self.broken[r] for r in req_ids if r in self.broken}
        rows = [i for i, r in enumerate(req_ids) if r not in failed]
        res = SampleResult([-1] * len(req_ids), None)
        if rows:
            part = sample(logits[rows] if failed else logits, [self.requests[req_ids[i]].params for i in rows],
                          [self.generators.get(req_ids[i]) for i in rows], checked=True)
            if failed:
                merge_rows(res, rows, part)
            else:
                res = part
        return res, failed | {req_ids[i]: why for i, why in res.failed.items()}

    def apply_sampled(self, sampled: dict[str, int]) -> None:
        """A non-leading rank: the tokens the leader sampled at the last step."""
        for req_id, token in sampled.items():
            state = self.requests.get(req_id)
            if state is not None:
                state.token_ids.append(token)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, sample: bool = True) -> RunnerOutput | None:
        """Run a step; without `sample` (a non-leading rank) only its forward passes run."""
        self._update_states(out)
        items = [(r, n, out.blend_pieces.get(r)) for r, n in out.num_scheduled_tokens.items()]
        result = RunnerOutput({}, {})
        for req_id, _, piece in items:
            if piece is not None and piece.score_layer is not None:
                result.blend_scores[req_id] = self._score(req_id, piece)
        items = [it for it in items if it[0] not in result.blend_scores]
        if not items:
            return result
        prof = self.profile
        halves = self._split(items)
        if halves is not None:
            hidden, sample_rows = self._forward_split(*halves)
        else:
            with prof.phase("prepare"):
                token_ids, positions, meta, sample_rows = self._prepare_inputs(items)
            with prof.phase("forward"):
                embeds = self._input_embeds(token_ids)
                if embeds is None and self.graphs is not None and self.graphs.applies(len(token_ids), meta):
                    hidden = self.graphs.run(token_ids, positions, meta)
                else:
                    hidden = self.model(token_ids, positions, self._attention(meta), input_embeds=embeds)
        if not sample:
            return None
        with prof.phase("sample"):
            return self._sample_step(result, items, hidden, sample_rows)

    def _split(self, items: list) -> tuple | None:
        tp = self.tp
        if tp is None or tp.overlap_min_tokens is None or sum(n for _, n, _ in items) < tp.overlap_min_tokens:
            return None
        return split_items(items)

    def _forward_split(self, first: list, second: list, cut: tuple[str, int] | None) -> tuple[torch.Tensor, list]:
        """A token-split step: both halves' inputs (the second half of a request cut in two starts
        where the first ends), their overlapped forward, and the joined hidden states and sample rows."""
        with self.profile.phase("prepare"):
            ids_a, pos_a, meta_a, rows_a = self._prepare_inputs(first, self._inputs)
            logit_rows = self._logit_rows
            state = self.requests[cut[0]] if cut else None
            if state is not None:
                state.num_computed_tokens += cut[1]
            try:
                ids_b, pos_b, meta_b, rows_b = self._prepare_inputs(second, self._inputs_b)
            finally:
                if state is not None:
                    state.num_computed_tokens -= cut[1]
            n_a = len(ids_a)
            for req_id, (pos, rows) in self._logit_rows.items():
                before = logit_rows.get(req_id, ([], []))
                logit_rows[req_id] = (before[0] + pos, before[1] + [r + n_a for r in rows])
            self._logit_rows = logit_rows
        with self.profile.phase("forward"):
            hidden_a, hidden_b = forward_overlapped(
                self.model, [(ids_a, pos_a, self._attention(meta_a)), (ids_b, pos_b, self._attention(meta_b))],
                self.tp.group)
        if cut is not None:
            rows_a = rows_a[:-1]  # the cut request's first part: one item, never sampled
        return torch.cat([hidden_a, hidden_b]), rows_a + [r + n_a if r is not None else None for r in rows_b]

    def _sample_step(self, result: RunnerOutput, items: list, hidden: torch.Tensor, sample_rows: list
                     ) -> RunnerOutput:
        """The step's logits (prompt logits asked for, and the rows to sample) and its tokens."""
        result.prompt_logits = {
            r: (pos, self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]).cpu())
            for r, (pos, rows) in self._logit_rows.items()}
        req_ids = [r for (r, _, _), row in zip(items, sample_rows) if row is not None]
        if not req_ids:
            return result
        rows = torch.tensor([row for row in sample_rows if row is not None], device=self.device)
        res, failed = self._sample(req_ids, self.model.compute_logits(hidden[rows]))
        for r, tok in zip(req_ids, res.token_ids):
            if r not in failed:
                self.requests[r].token_ids.append(tok)
        if res.logprobs is not None:
            result.logprobs = {r: lp for r, lp in zip(req_ids, res.logprobs) if lp is not None and r not in failed}
        result.sampled = {r: tok for r, tok in zip(req_ids, res.token_ids) if r not in failed}
        result.failed = failed
        return result

