"""loadgen's `mixed` workload as the serving benchmarks (`bench disagg`, `bench soak`) build it
from their options: long prompts with few output tokens among short decode-heavy requests, token
ids drawn from the model's vocabulary (`vocab_token_range`, which `bench serve` uses too)."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def length_range(option: str) -> Callable[[str], tuple[int, int]]:
    """An argparse `type` for `option`'s LO:HI lengths (loadgen's rule: 1 <= LO <= HI)."""
    def parse(text: str) -> tuple[int, int]:
        from loadgen.workloads.base import WorkloadError, parse_length_range

        try:
            return parse_length_range(text, option)
        except WorkloadError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def vocab_token_range(model: str) -> tuple[int, int]:
    """Token ids [LO, HI) for the random prompts of a benchmark on `model`: well inside its
    vocabulary (clear of the special tokens at its ends)."""
    from kvweave.model_files import load_tokenizer

    vocab = load_tokenizer(model).tokenizer.vocab_size
    return vocab // 20, vocab - vocab // 20


def mixed_workload(config):
    """The MixedWorkload of a benchmark config with model, long_fraction, long_input_len,
    long_output_len, short_input_len, short_output_len and seed."""
    from loadgen.workloads import MixedWorkload

    return MixedWorkload(long_fraction=config.long_fraction, long_input_len=config.long_input_len,
                         long_output_len=config.long_output_len, short_input_len=config.short_input_len,
                         short_output_len=config.short_output_len, seed=config.seed,
                         token_range=vocab_token_range(config.model))
