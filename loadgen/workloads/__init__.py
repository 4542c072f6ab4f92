"""The load generator's workloads: a registry, their command-line options, and a builder.

    parser = argparse.ArgumentParser(); add_workload_arguments(parser)   # (the runner adds --seed)
    workload = build_workload(parser.parse_args())                       # WorkloadError on bad input
    for session in workload.sessions(): ...                              # may be endless

Every workload is deterministic for a seed (`args.seed`) and yields `loadgen.types.Session`s in
arrival order. The synthetic and RAG workloads are endless; the traces repeat when a run asks for
more than they hold (see `loadgen.workloads.replay`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from loadgen.types import Workload, WorkloadError
from loadgen.workloads.base import DATA_DIR, DEFAULT_DATASETS
from loadgen.workloads.chat import PAUSE_DISTRIBUTIONS, AgentWorkload, MultiTurnWorkload
from loadgen.workloads.rag import RagWorkload
from loadgen.workloads.replay import AzureWorkload, MooncakeWorkload
from loadgen.workloads.synthetic import PrefixRepetitionWorkload, RandomWorkload

__all__ = ["WORKLOADS", "DEFAULT_DATASETS", "add_workload_arguments", "build_workload", "AgentWorkload",
           "AzureWorkload", "MooncakeWorkload", "MultiTurnWorkload", "PrefixRepetitionWorkload", "RagWorkload",
           "RandomWorkload"]

WORKLOADS: dict[str, type] = {cls.name: cls for cls in (
    RagWorkload, PrefixRepetitionWorkload, MultiTurnWorkload, AgentWorkload, MooncakeWorkload, AzureWorkload,
    RandomWorkload)}
"""Workload name -> class: each has `name`, a one-line `summary`, `from_args(args)` and `sessions()`."""


def _default(text: str) -> str:
    """A help suffix stating a default that depends on the workload. The `%(default).0s` renders as
    nothing but keeps ArgumentDefaultsHelpFormatter from appending `(default: None)`."""
    return f" (default: {text})%(default).0s"


def _shown(path: Path) -> str:
    """A default data file as the help shows it: relative to the data folder's parent's parent."""
    return f"../shared/data/{path.relative_to(DATA_DIR).as_posix()}"


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --workload and every workload's options (one argument group each) to `parser`."""
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", choices=list(WORKLOADS), default="random",
                       help="what to send: " + "; ".join(f"{n}: {c.summary}" for n, c in WORKLOADS.items())
                       + " (default: %(default)s)")
    group.add_argument("--dataset", metavar="PATH", default=None,
                       help="dataset or trace file of the rag, mooncake and azure workloads"
                       + _default(", ".join(f"{name}: {_shown(p)}" for name, p in DEFAULT_DATASETS.items())))
    group.add_argument("--output-len", type=int, metavar="N", default=None,
                       help="output tokens per request (random, prefix-repetition, rag) or per reply "
                       "(multi-turn, agent)" + _default("32 for rag, 128 otherwise"))
    group.add_argument("--token-range", metavar="LO:HI", default="1000:30000",
                       help="token ids [LO, HI) of token-id prompts (random, prefix-repetition, mooncake, "
                       "azure); must lie within the model's vocabulary (default: %(default)s)")

    group = parser.add_argument_group("random workload")
    group.add_argument("--input-len", type=int, metavar="N", default=256,
                       help="prompt tokens (default: %(default)s)")
    group.add_argument("--range-ratio", type=float, metavar="R", default=0.0,
                       help="input and output lengths uniform in [L*(1-R), L*(1+R)], 0 <= R < 1 "
                       "(default: %(default)s)")

    group = parser.add_argument_group("prefix-repetition workload")
    group.add_argument("--prefix-len", type=int, metavar="N", default=256,
                       help="tokens of each shared prefix (default: %(default)s)")
    group.add_argument("--suffix-len", type=int, metavar="N", default=64,
                       help="fresh random tokens after the prefix (default: %(default)s)")
    group.add_argument("--num-prefixes", type=int, metavar="N", default=4,
                       help="distinct prefixes, used equally in shuffled rounds (default: %(default)s)")

    group = parser.add_argument_group("rag workload (questions drawn endlessly, with replacement)")
    group.add_argument("--num-docs", type=int, metavar="N", default=4,
                       help="passages per question, each a reusable chunk (default: %(default)s)")
    group.add_argument("--popularity-skew", type=float, metavar="S", default=0.0,
                       help="question popularity p(rank) ~ 1/(rank+1)^S over a seeded order of the "
                       "questions; 0 is uniform, larger makes popular questions recur (default: %(default)s)")
    group.add_argument("--max-doc-words", type=int, metavar="N", default=0,
                       help="cut each passage to N words, for short CPU runs; 0 keeps it whole "
                       "(default: %(default)s)")
    group.add_argument("--shuffle-docs", action="store_true",
                       help="present each request's passages in a fresh random order (retrieval order varies "
                       "with the query's wording), so a recurring question's passages come at other positions: "
                       "chunk reuse rather than prefix reuse")
    group.add_argument("--no-chunks", action="store_true",
                       help="send the same text as one plain prompt, for servers without kvweave's chunk API")

    group = parser.add_argument_group("multi-turn and agent workloads (endless sessions)")
    group.add_argument("--num-turns", type=int, metavar="N", default=4,
                       help="turns (requests) per session (default: %(default)s)")
    group.add_argument("--turn-input-len", type=int, metavar="WORDS", default=48,
                       help="words of each user message (default: %(default)s)")
    group.add_argument("--system-prompt-len", type=int, metavar="WORDS", default=None,
                       help="words of the system message every session starts with, the same in all "
                       "sessions; 0 for none" + _default("0 for multi-turn, 64 for agent"))

    group = parser.add_argument_group("agent workload")
    group.add_argument("--tool-output-len", type=int, metavar="WORDS", default=96,
                       help="words of each tool result, sent as a user message 'Tool result: ...' "
                       "(default: %(default)s)")
    group.add_argument("--tool-pause-dist", choices=PAUSE_DISTRIBUTIONS, default="exponential",
                       help="distribution of the tool-call pause before each tool result (lognormal: "
                       "sigma 1) (default: %(default)s)")
    group.add_argument("--tool-pause-mean", type=float, metavar="SECONDS", default=0.5,
                       help="mean tool-call pause (default: %(default)s)")

    group = parser.add_argument_group("trace replay: mooncake and azure (the trace repeats if the run "
                                      "asks for more requests)")
    group.add_argument("--time-scale", type=float, metavar="X", default=1.0,
                       help="multiplies the trace's times: 0.1 replays ten times faster, 2 at half speed "
                       "(default: %(default)s)")
    group.add_argument("--trace-offset", type=int, metavar="N", default=0,
                       help="skip the first N records (default: %(default)s)")
    group.add_argument("--max-input-len", type=int, metavar="N", default=0,
                       help="skip records whose prompt is longer than N tokens; 0: no limit (default: %(default)s)")
    group.add_argument("--max-output-len", type=int, metavar="N", default=0,
                       help="cap each record's output tokens at N; 0: no cap (default: %(default)s)")
    group.add_argument("--block-size", type=int, metavar="N", default=512,
                       help="mooncake: tokens per trace block; prompts are scaled by N/512 (use a "
                       "small N with a small model) (default: %(default)s)")


def build_workload(args: argparse.Namespace) -> Workload:
    """The workload `args.workload` with its options from `args` (parsed with add_workload_arguments'
    options and the runner's --seed); WorkloadError with a message for the user on bad input."""
    cls = WORKLOADS.get(args.workload)
    if cls is None:
        raise WorkloadError(f"unknown workload {args.workload!r}; choose from {', '.join(WORKLOADS)}")
    if args.dataset is not None and args.workload not in DEFAULT_DATASETS:
        raise WorkloadError(f"--dataset applies to the {', '.join(DEFAULT_DATASETS)} workloads, "
                            f"not to {args.workload}")
    if not hasattr(args, "seed"):
        args = argparse.Namespace(**vars(args), seed=0)
    return cls.from_args(args)
