"""Model runner: turns a SchedulerOutput into batch tensors, runs the forward, samples.

It holds the model and the KV cache tensors and never decides policy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from worker.attention import AttentionMetadata, PagedAttention, PrefillSeq, decode_kernel_for, kv_cache_shape
from worker.model import Transformer
from kvweave.sampling_params import SamplingParams
from worker.sampling import SampleResult, sample
from worker.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, int]
    logprobs: dict[str, tuple[float, dict[int, float]]]


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int) -> None:
        self.model, self.block_size = model, block_size
        a = model.args
        self.kv_cache = torch.zeros(kv_cache_shape(a.n_layers, num_blocks, block_size, a.n_kv_heads, a.head_dim),
                                    dtype=model.dtype)
        logger.info("KV cache: %d blocks of %d tokens, %.2f GiB", num_blocks, block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**30)

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _build_metadata(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        token_ids, positions, slot_mapping, prefills = [], [], [], []
        decodes = [s for s in scheduled if s.is_decode]
        offset = 0
        for s in scheduled:
            n = len(s.token_ids)
            bt = torch.tensor(s.block_table, dtype=torch.long)
            token_ids.extend(s.token_ids)
            if s.positions is not None:  # a sparse piece of a chunk blend
                pos = torch.tensor(s.positions)
                positions.append(pos)
                slot_mapping.append(self._slots(bt, pos))
                ctx = self._slots(bt, torch.arange(int(pos[-1]) + 1))
                prefills.append(PrefillSeq(offset, n, s.start_pos, ctx, pos, s.correction))
                offset += n
                continue
            pos = torch.arange(s.start_pos, s.start_pos + n)
            positions.append(pos)
            slot_mapping.append(self._slots(bt, pos))
            if n > 1:
                ctx = self._slots(bt, torch.arange(s.start_pos + n)) if s.start_pos else None
                prefills.append(PrefillSeq(offset, n, s.start_pos, ctx))
            offset += n
        meta = AttentionMetadata(torch.cat(slot_mapping), len(decodes), prefills=prefills)
        if decodes:
            self._decode_metadata(meta, decodes)
        return torch.tensor(token_ids, dtype=torch.long), torch.cat(positions), meta

    def _decode_metadata(self, meta: AttentionMetadata, decodes: list[ScheduledRequest]) -> None:
        bs = self.block_size
        ctx_lens = torch.tensor([s.start_pos + 1 for s in decodes])
        max_len = int(ctx_lens.max())
        max_blocks = -(-max_len // bs)
        bt = torch.zeros(len(decodes), max_blocks, dtype=torch.long)
        for i, s in enumerate(decodes):
            n = min(len(s.block_table), max_blocks)
            bt[i, :n] = torch.tensor(s.block_table[:n])
        meta.decode_block_tables, meta.decode_context_lens = bt, ctx_lens
        if decode_kernel_for(self.kv_cache) is None:  # the torch path gathers padded contexts
            slots = (bt[:, :, None] * bs + torch.arange(bs)).view(len(decodes), -1)[:, :max_len].contiguous()
            pad = torch.arange(max_len)[None, :] >= ctx_lens[:, None]
            bias = torch.zeros(pad.shape, dtype=self.model.dtype).masked_fill_(pad, float("-inf"))
            meta.decode_slots, meta.decode_bias = slots, bias[None, :, None, :]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, params: dict[str, SamplingParams],
                generators: dict[str, torch.Generator | None]) -> RunnerOutput:
        if not out.scheduled:
            return RunnerOutput({}, {})
        token_ids, positions, meta = self._build_metadata(out.scheduled)
        backend = PagedAttention(self.kv_cache, meta, self.model.args.n_heads, self.block_size)
        hidden = self.model(token_ids, positions, backend)
        rows, req_ids, offset = [], [], 0
        for s in out.scheduled:
            offset += len(s.token_ids)
            if s.sample:
                rows.append(offset - 1)
                req_ids.append(s.req_id)
        if not rows:
            return RunnerOutput({}, {})
        logits = self.model.compute_logits(hidden[torch.tensor(rows)])
        res: SampleResult = sample(logits, [params[r] for r in req_ids], [generators[r] for r in req_ids])
        logprobs = {}
        if res.logprobs is not None:
            logprobs = {r: lp for r, lp in zip(req_ids, res.logprobs) if lp is not None}
        return RunnerOutput(dict(zip(req_ids, res.token_ids)), logprobs)
