"""The load generator's workloads: a registry, their options (a dataclass per workload, whose fields
make the command-line flags through kvweave.config_flags), and a builder.

    parser = argparse.ArgumentParser(); add_workload_arguments(parser)   # (the runner adds --seed)
    workload = build_workload(parser.parse_args())                       # WorkloadError on bad input
    for session in workload.sessions(): ...                              # may be endless

Every workload is deterministic for a seed (`args.seed`) and yields `loadgen.types.Session`s in
arrival order. The synthetic (random, prefix-repetition, mixed), RAG and multimodal workloads are
endless; the traces repeat when a run asks for more than they hold (see `loadgen.workloads.replay`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from kvweave.config_flags import add_config_args, config_kwargs, flag
from loadgen.types import Workload, WorkloadError
from loadgen.workloads.base import DATA_DIR, DEFAULT_DATASETS, at_least, parse_token_range
from loadgen.workloads.chat import AgentOptions, AgentWorkload, ChatOptions, MultiTurnWorkload
from loadgen.workloads.multimodal import MultimodalOptions, MultimodalWorkload
from loadgen.workloads.rag import RagOptions, RagWorkload
from loadgen.workloads.replay import AzureWorkload, MooncakeWorkload, TraceOptions
from loadgen.workloads.synthetic import (MixedOptions, MixedWorkload, PrefixRepetitionOptions, PrefixRepetitionWorkload,
                                         RandomOptions, RandomWorkload)

__all__ = ["WORKLOADS", "DEFAULT_DATASETS", "OPTION_GROUPS", "WorkloadConfig", "add_workload_arguments",
           "build_workload", "AgentWorkload",
           "AzureWorkload", "MixedWorkload", "MooncakeWorkload", "MultimodalWorkload", "MultiTurnWorkload",
           "PrefixRepetitionWorkload", "RagWorkload", "RandomWorkload"]

WORKLOADS: dict[str, type] = {cls.name: cls for cls in (
    RagWorkload, PrefixRepetitionWorkload, MultiTurnWorkload, AgentWorkload, MooncakeWorkload, AzureWorkload,
    RandomWorkload, MixedWorkload, MultimodalWorkload)}
"""Workload name -> class: each has `name`, a one-line `summary`, `options` (the dataclasses of its
options, checked before it is built), `from_args(args)` and `sessions()`."""


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send: the workload and the options every workload shares (`--workload` and its group)."""

    workload: str = field(default="random", metadata=flag(choices=tuple(WORKLOADS)))
    """what to send"""
    dataset: str | None = field(default=None, metadata=flag(metavar="PATH", default_text=", ".join(
        f"{name}: ../shared/data/{path.relative_to(DATA_DIR).as_posix()}" for name, path in DEFAULT_DATASETS.items())))
    """dataset or trace file of the rag, mooncake and azure workloads"""
    output_len: int | None = field(default=None, metadata=flag(metavar="N", default_text="32 for rag, 128 otherwise"))
    """output tokens per request (random, prefix-repetition, rag, multimodal) or per reply (multi-turn,
    agent)"""
    token_range: str = field(default="1000:30000", metadata=flag(metavar="LO:HI"))
    """token ids [LO, HI) of token-id prompts (random, prefix-repetition, mixed, mooncake, azure); must lie
    within the model's vocabulary"""

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise WorkloadError(f"unknown workload {self.workload!r}; choose from {', '.join(WORKLOADS)}")
        if self.dataset is not None and self.workload not in DEFAULT_DATASETS:
            raise WorkloadError(f"--dataset applies to the {', '.join(DEFAULT_DATASETS)} workloads, "
                                f"not to {self.workload}")
        if self.output_len is not None:
            at_least(self.output_len, 1, "--output-len")
        parse_token_range(self.token_range)


OPTION_GROUPS: tuple[tuple[str, type], ...] = (
    ("random workload", RandomOptions),
    ("prefix-repetition workload", PrefixRepetitionOptions),
    ("mixed workload (each request is tagged class long or short)", MixedOptions),
    ("rag workload (questions drawn endlessly, with replacement)", RagOptions),
    ("multi-turn and agent workloads (endless sessions)", ChatOptions),
    ("agent workload", AgentOptions),
    ("multimodal workload (images then an instruction; each request is tagged class text, image_first or "
     "image_repeat)", MultimodalOptions),
    ("trace replay: mooncake and azure (the trace repeats if the run asks for more requests)", TraceOptions),
)
"""--help's argument group of each workload's options dataclass, in the order shown."""


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of WorkloadConfig and of every workload's options (one argument group each),
    without environment overrides (see kvweave.config_flags)."""
    what = "what to send: " + "; ".join(f"{n}: {c.summary}" for n, c in WORKLOADS.items())
    add_config_args(parser.add_argument_group("workload"), WorkloadConfig, help={"workload": what}, env=False)
    for title, cls in OPTION_GROUPS:
        add_config_args(parser.add_argument_group(title), cls, env=False)


def build_workload(args: argparse.Namespace) -> Workload:
    """The workload `args.workload` with its options from `args` (parsed with add_workload_arguments'
    options and the runner's --seed); WorkloadError with a message for the user on bad input. Only
    the chosen workload's options are checked (the others are not used)."""
    cls = WORKLOADS[WorkloadConfig(**config_kwargs(WorkloadConfig, args)).workload]
    for options in cls.options:
        options(**config_kwargs(options, args))
    if not hasattr(args, "seed"):
        args = argparse.Namespace(**vars(args), seed=0)
    return cls.from_args(args)
