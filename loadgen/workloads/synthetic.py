"""Token-id workloads with no dataset: `random` and `prefix-repetition` (the shapes of vLLM's
random and prefix-repetition benchmark datasets), and `mixed` (a few long prompts with few output
tokens, document prefills, among many short decode-heavy chat turns: the load prefill/decode
disaggregation is for). All are endless."""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvweave.config_flags import flag
from loadgen.types import Session, Turn, WorkloadError
from loadgen.workloads.base import (at_least, check_fraction, check_length_range, given, make_rng, parse_length_range,
                                    parse_token_range, random_tokens, spread_evenly)


@dataclass(frozen=True)
class RandomOptions:
    """Options of the `random` workload."""

    input_len: int = field(default=256, metadata=flag(metavar="N"))
    """prompt tokens"""
    range_ratio: float = field(default=0.0, metadata=flag(metavar="R"))
    """input and output lengths uniform in [L*(1-R), L*(1+R)], 0 <= R < 1"""

    def __post_init__(self) -> None:
        at_least(self.input_len, 1, "--input-len")
        if not 0.0 <= self.range_ratio < 1.0:
            raise WorkloadError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")


@dataclass(frozen=True)
class PrefixRepetitionOptions:
    """Options of the `prefix-repetition` workload."""

    prefix_len: int = field(default=256, metadata=flag(metavar="N"))
    """tokens of each shared prefix"""
    suffix_len: int = field(default=64, metadata=flag(metavar="N"))
    """fresh random tokens after the prefix"""
    num_prefixes: int = field(default=4, metadata=flag(metavar="N"))
    """distinct prefixes, used equally in shuffled rounds"""

    def __post_init__(self) -> None:
        at_least(self.prefix_len, 1, "--prefix-len")
        at_least(self.suffix_len, 0, "--suffix-len")
        at_least(self.num_prefixes, 1, "--num-prefixes")


@dataclass(frozen=True)
class MixedOptions:
    """Options of the `mixed` workload."""

    long_fraction: float = field(default=0.1, metadata=flag(metavar="F"))
    """share of requests that are long, 0 <= F <= 1"""
    long_input_len: str = field(default="4000:6000", metadata=flag(metavar="LO:HI"))
    """prompt tokens of a long request, uniform in [LO, HI]"""
    long_output_len: int = field(default=8, metadata=flag(metavar="N"))
    """output tokens of a long request"""
    short_input_len: str = field(default="32:128", metadata=flag(metavar="LO:HI"))
    """prompt tokens of a short request, uniform in [LO, HI]"""
    short_output_len: int = field(default=128, metadata=flag(metavar="N"))
    """output tokens of a short request"""

    def __post_init__(self) -> None:
        check_fraction(self.long_fraction, "--long-fraction")
        parse_length_range(self.long_input_len, "--long-input-len")
        parse_length_range(self.short_input_len, "--short-input-len")
        at_least(self.long_output_len, 1, "--long-output-len")
        at_least(self.short_output_len, 1, "--short-output-len")


class RandomWorkload:
    """One-turn requests of random token ids; lengths fixed or uniform in [L*(1-r), L*(1+r)]."""

    name = "random"
    summary = "random token prompts, fixed or ranged input/output lengths"
    default_output_len = 128
    options = (RandomOptions,)

    def __init__(self, *, input_len: int = 256, output_len: int = 128, range_ratio: float = 0.0,
                 token_range: tuple[int, int] = (1000, 30000), seed: int = 0) -> None:
        at_least(input_len, 1, "--input-len")
        at_least(output_len, 1, "--output-len")
        at_least(seed, 0, "--seed")
        if not 0.0 <= range_ratio < 1.0:
            raise WorkloadError(f"--range-ratio must be in [0, 1), got {range_ratio}")
        self.input_len, self.output_len, self.range_ratio = input_len, output_len, range_ratio
        self.token_range, self.seed = token_range, seed

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RandomWorkload:
        return cls(input_len=args.input_len, output_len=given(args.output_len, cls.default_output_len),
                   range_ratio=args.range_ratio, token_range=parse_token_range(args.token_range),
                   seed=args.seed)

    def _bounds(self, length: int) -> tuple[int, int]:
        """Inclusive length range for a nominal length (vLLM: int(L*(1-r)) .. int(L*(1+r))), at least 1."""
        return max(1, int(length * (1 - self.range_ratio))), max(1, int(length * (1 + self.range_ratio)))

    def sessions(self) -> Iterator[Session]:
        rng = make_rng(self.seed, self.name)
        in_lo, in_hi = self._bounds(self.input_len)
        out_lo, out_hi = self._bounds(self.output_len)
        for i in itertools.count():
            n_in = int(rng.integers(in_lo, in_hi + 1))
            n_out = int(rng.integers(out_lo, out_hi + 1))
            yield Session(f"{self.name}-{i}", [Turn(max_tokens=n_out,
                                                    token_ids=random_tokens(rng, n_in, self.token_range))])


class PrefixRepetitionWorkload:
    """One-turn requests: one of `num_prefixes` fixed random prefixes, then a fresh random suffix.

    Prefixes are used equally: each round of `num_prefixes` requests uses every prefix once, in a
    shuffled order. Distinct prefixes start with distinct tokens (when the token range allows), so
    requests with different prefixes share no leading tokens.
    """

    name = "prefix-repetition"
    summary = "shared random prefixes + fresh random suffixes (vLLM's prefix-repetition shape)"
    default_output_len = 128
    options = (PrefixRepetitionOptions,)

    def __init__(self, *, prefix_len: int = 256, suffix_len: int = 64, num_prefixes: int = 4,
                 output_len: int = 128, token_range: tuple[int, int] = (1000, 30000), seed: int = 0) -> None:
        at_least(prefix_len, 1, "--prefix-len")
        at_least(suffix_len, 0, "--suffix-len")
        at_least(num_prefixes, 1, "--num-prefixes")
        at_least(output_len, 1, "--output-len")
        at_least(seed, 0, "--seed")
        self.prefix_len, self.suffix_len, self.num_prefixes = prefix_len, suffix_len, num_prefixes
        self.output_len, self.token_range, self.seed = output_len, token_range, seed

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PrefixRepetitionWorkload:
        return cls(prefix_len=args.prefix_len, suffix_len=args.suffix_len, num_prefixes=args.num_prefixes,
                   output_len=given(args.output_len, cls.default_output_len),
                   token_range=parse_token_range(args.token_range), seed=args.seed)

    def prefixes(self) -> list[tuple[int, ...]]:
        """The `num_prefixes` prefixes of this seed."""
        rng = make_rng(self.seed, self.name, 0)
        lo, hi = self.token_range
        firsts = rng.choice(hi - lo, size=self.num_prefixes, replace=self.num_prefixes > hi - lo) + lo
        return [(int(first),) + random_tokens(rng, self.prefix_len - 1, self.token_range) for first in firsts]

    def sessions(self) -> Iterator[Session]:
        prefixes = self.prefixes()
        rng = make_rng(self.seed, self.name, 1)
        i = 0
        while True:
            for k in rng.permutation(self.num_prefixes).tolist():
                tokens = prefixes[k] + random_tokens(rng, self.suffix_len, self.token_range)
                yield Session(f"{self.name}-{i}", [Turn(max_tokens=self.output_len, token_ids=tokens)],
                              tags={"prefix": k})
                i += 1


class MixedWorkload:
    """One-turn requests of random token ids in two classes: long (prompt length uniform in
    `long_input_len`, `long_output_len` output tokens: a document prefill) or short
    (`short_input_len`, `short_output_len`: a chat turn). A `long_fraction` share of the requests is
    long, spread evenly (`spread_evenly`, with a seeded phase: any n consecutive requests hold n*f long
    ones, rounded either way). Each session's tags say its
    `class`, "long" or "short", so results can be split by class. Every prompt is fresh random
    tokens, so prompts share no prefix (beyond chance agreement on a first token)."""

    name = "mixed"
    summary = "long prompts with few output tokens (document prefills) among short decode-heavy ones (chat)"
    options = (MixedOptions,)

    def __init__(self, *, long_fraction: float = 0.1, long_input_len: tuple[int, int] = (4000, 6000),
                 long_output_len: int = 8, short_input_len: tuple[int, int] = (32, 128),
                 short_output_len: int = 128, token_range: tuple[int, int] = (1000, 30000), seed: int = 0) -> None:
        check_fraction(long_fraction, "--long-fraction")
        check_length_range(long_input_len, "--long-input-len")
        check_length_range(short_input_len, "--short-input-len")
        at_least(long_output_len, 1, "--long-output-len")
        at_least(short_output_len, 1, "--short-output-len")
        at_least(seed, 0, "--seed")
        self.long_fraction, self.token_range, self.seed = long_fraction, token_range, seed
        # class -> ((lo, hi) prompt tokens, output tokens)
        self.classes = {"long": (long_input_len, long_output_len), "short": (short_input_len, short_output_len)}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MixedWorkload:
        if args.output_len is not None:
            raise WorkloadError("--output-len does not apply to the mixed workload: use --long-output-len "
                                "and --short-output-len")
        return cls(long_fraction=args.long_fraction,
                   long_input_len=parse_length_range(args.long_input_len, "--long-input-len"),
                   long_output_len=args.long_output_len,
                   short_input_len=parse_length_range(args.short_input_len, "--short-input-len"),
                   short_output_len=args.short_output_len, token_range=parse_token_range(args.token_range),
                   seed=args.seed)

    def sessions(self) -> Iterator[Session]:
        rng = make_rng(self.seed, self.name)
        for i, long in enumerate(spread_evenly(self.long_fraction, float(rng.random()))):
            kind = "long" if long else "short"
            (lo, hi), n_out = self.classes[kind]
            tokens = random_tokens(rng, int(rng.integers(lo, hi + 1)), self.token_range)
            yield Session(f"{self.name}-{i}", [Turn(max_tokens=n_out, token_ids=tokens)], tags={"class": kind})
