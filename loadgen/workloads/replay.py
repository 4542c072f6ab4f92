"""Trace replay: `mooncake` (prefix-sharing blocks from hash ids) and `azure` (lengths and times).

Both read and validate the whole trace when built, then make each request's tokens as it is
asked for. Records are replayed in timestamp order (a stable sort, so a trace whose timestamps go
back is still sent in time order), from --trace-offset on; arrival_s is the record's time after
the first replayed record, times --time-scale. A record whose input is longer than
--max-input-len tokens is skipped (`skipped` counts them); outputs are capped at --max-output-len.
When a run asks for more requests than the trace holds, the trace repeats: each pass starts one
mean inter-arrival gap after the previous pass's last request (tags carry `pass` and `line`).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvweave.config_flags import flag
from loadgen.traces import MOONCAKE_BLOCK_TOKENS, AzureRecord, MooncakeRecord, block_tokens, read_azure, read_mooncake
from loadgen.types import Session, Turn, WorkloadError
from loadgen.workloads.base import DEFAULT_DATASETS, at_least, make_rng, parse_token_range, random_tokens


@dataclass(frozen=True)
class TraceOptions:
    """Options of the trace replays, `mooncake` and `azure`."""

    time_scale: float = field(default=1.0, metadata=flag(metavar="X"))
    """multiplies the trace's times: 0.1 replays ten times faster, 2 at half speed"""
    trace_offset: int = field(default=0, metadata=flag(metavar="N"))
    """skip the first N records"""
    max_input_len: int = field(default=0, metadata=flag(metavar="N"))
    """skip records whose prompt is longer than N tokens; 0: no limit"""
    max_output_len: int = field(default=0, metadata=flag(metavar="N"))
    """cap each record's output tokens at N; 0: no cap"""
    block_size: int = field(default=MOONCAKE_BLOCK_TOKENS, metadata=flag(metavar="N"))
    """mooncake: tokens per trace block; prompts are scaled by N/512 (use a small N with a small model)"""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise WorkloadError(f"--time-scale must be a positive number, got {self.time_scale}")
        at_least(self.trace_offset, 0, "--trace-offset")
        at_least(self.max_input_len, 0, "--max-input-len")
        at_least(self.max_output_len, 0, "--max-output-len")
        at_least(self.block_size, 1, "--block-size")


class TraceReplay:
    """Replay order, filtering, timing and repetition common to the trace workloads."""

    name = ""
    options = (TraceOptions,)

    def __init__(self, read: Callable[[Path], Sequence[MooncakeRecord | AzureRecord]], source: Path, *,
                 time_scale: float, trace_offset: int, max_input_len: int, max_output_len: int) -> None:
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise WorkloadError(f"--time-scale must be a positive number, got {time_scale}")
        at_least(trace_offset, 0, "--trace-offset")
        at_least(max_input_len, 0, "--max-input-len")
        at_least(max_output_len, 0, "--max-output-len")
        records = read(source)
        if trace_offset >= len(records):
            raise WorkloadError(f"--trace-offset {trace_offset} skips all {len(records)} records of {source}")
        self.time_scale, self.max_output_len = time_scale, max_output_len
        kept = [r for r in records[trace_offset:] if not max_input_len or self.input_len(r) <= max_input_len]
        self.skipped = len(records) - trace_offset - len(kept)
        """Records left out for being longer than --max-input-len."""
        if not kept:
            raise WorkloadError(f"all {self.skipped} records of {source} from --trace-offset {trace_offset} on are "
                                f"longer than --max-input-len {max_input_len} tokens")
        self.records = sorted(kept, key=lambda r: r.timestamp_s)

    def input_len(self, record: MooncakeRecord | AzureRecord) -> int:
        """Prompt tokens sent for a record."""
        return record.input_length

    def output_len(self, record: MooncakeRecord | AzureRecord) -> int:
        """max_tokens for a record: the trace's, capped by --max-output-len."""
        return min(record.output_length, self.max_output_len) if self.max_output_len else record.output_length

    def prompt(self, record: MooncakeRecord | AzureRecord, pass_index: int) -> tuple[int, ...]:
        """The prompt's token ids for a record in a given pass over the trace."""
        raise NotImplementedError

    def tags(self, record: MooncakeRecord | AzureRecord) -> dict:
        """Workload facts kept with each result, besides the line and the pass."""
        return {}

    def period_s(self) -> float:
        """Time between the starts of two passes: the replayed span plus one mean gap."""
        n = len(self.records)
        span = (self.records[-1].timestamp_s - self.records[0].timestamp_s) * self.time_scale
        return span * n / (n - 1) if n > 1 else 0.0

    def sessions(self) -> Iterator[Session]:
        start, period = self.records[0].timestamp_s, self.period_s()
        for pass_index in itertools.count():
            for record in self.records:
                turn = Turn(max_tokens=self.output_len(record), token_ids=self.prompt(record, pass_index))
                yield Session(f"{self.name}-p{pass_index}-l{record.line}", [turn],
                              arrival_s=pass_index * period + (record.timestamp_s - start) * self.time_scale,
                              tags={"line": record.line, "pass": pass_index, **self.tags(record)})


class MooncakeWorkload(TraceReplay):
    """Mooncake trace replay: each hash id is a deterministic block of `block_size` tokens (see
    `loadgen.traces.block_tokens`), so requests share exactly the blocks the trace says they share.
    The prompt is the record's blocks, cut to ceil(input_length * block_size / 512) tokens (its last
    block partial, as in the trace); block_size 512 replays the trace's lengths as they are."""

    name = "mooncake"
    summary = "replay of a Mooncake trace: shared prefix blocks, lengths and arrival times"

    def __init__(self, path: str | os.PathLike = DEFAULT_DATASETS["mooncake"], *, block_size: int = 512,
                 token_range: tuple[int, int] = (1000, 30000), time_scale: float = 1.0, trace_offset: int = 0,
                 max_input_len: int = 0, max_output_len: int = 0) -> None:
        at_least(block_size, 1, "--block-size")
        self.block_size, self.token_range = block_size, token_range
        super().__init__(read_mooncake, Path(path), time_scale=time_scale, trace_offset=trace_offset,
                         max_input_len=max_input_len, max_output_len=max_output_len)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MooncakeWorkload:
        return cls(args.dataset or DEFAULT_DATASETS[cls.name], block_size=args.block_size,
                   token_range=parse_token_range(args.token_range), time_scale=args.time_scale,
                   trace_offset=args.trace_offset, max_input_len=args.max_input_len,
                   max_output_len=args.max_output_len)

    def input_len(self, record: MooncakeRecord) -> int:
        return -(-record.input_length * self.block_size // MOONCAKE_BLOCK_TOKENS)

    def prompt(self, record: MooncakeRecord, pass_index: int) -> tuple[int, ...]:
        lo, hi = self.token_range
        tokens = [t for h in record.hash_ids for t in block_tokens(h, self.block_size, lo, hi)]
        return tuple(tokens[:self.input_len(record)])

    def tags(self, record: MooncakeRecord) -> dict:
        return {"blocks": len(record.hash_ids)}


class AzureWorkload(TraceReplay):
    """Azure trace replay: random token prompts of ContextTokens tokens (fresh in every pass, seeded
    by --seed and the line), GeneratedTokens output tokens, arrivals from TIMESTAMP."""

    name = "azure"
    summary = "replay of an Azure LLM trace: lengths and arrival times, random token prompts"

    def __init__(self, path: str | os.PathLike = DEFAULT_DATASETS["azure"], *,
                 token_range: tuple[int, int] = (1000, 30000), time_scale: float = 1.0, trace_offset: int = 0,
                 max_input_len: int = 0, max_output_len: int = 0, seed: int = 0) -> None:
        at_least(seed, 0, "--seed")
        self.token_range, self.seed = token_range, seed
        super().__init__(read_azure, Path(path), time_scale=time_scale, trace_offset=trace_offset,
                         max_input_len=max_input_len, max_output_len=max_output_len)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AzureWorkload:
        return cls(args.dataset or DEFAULT_DATASETS[cls.name], token_range=parse_token_range(args.token_range),
                   time_scale=args.time_scale, trace_offset=args.trace_offset, max_input_len=args.max_input_len,
                   max_output_len=args.max_output_len, seed=args.seed)

    def prompt(self, record: AzureRecord, pass_index: int) -> tuple[int, ...]:
        rng = make_rng(self.seed, self.name, pass_index, record.line)
        return random_tokens(rng, record.input_length, self.token_range)
