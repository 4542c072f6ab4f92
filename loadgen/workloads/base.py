"""Helpers shared by the workloads: default data paths, option checks, seeded random streams."""
from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from loadgen.types import WorkloadError

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
"""`../shared/data` next to the repository root (the checkout's parent holds `shared/`)."""
DEFAULT_DATASETS = {
    "rag": DATA_DIR / "rag" / "musique_dev.json",
    "mooncake": DATA_DIR / "traces" / "mooncake_conversation.jsonl",
    "azure": DATA_DIR / "traces" / "azure2023_conv.csv",
}
"""The file each file-based workload reads when --dataset is not given."""


def at_least(value: int | float, minimum: int | float, option: str) -> None:
    """A WorkloadError unless value >= minimum (and a finite number)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
        raise WorkloadError(f"{option} must be at least {minimum}, got {value}")


def _split_range(text: str, option: str, need: str) -> tuple[int, int]:
    """`LO:HI` -> (lo, hi) as integers, unchecked; a WorkloadError saying `need` when it is not that."""
    lo_text, sep, hi_text = str(text).partition(":")
    try:
        if sep:
            return int(lo_text), int(hi_text)
    except ValueError:
        pass
    raise WorkloadError(f"{option} must be LO:HI with integers {need}, got {text!r}")


def check_fraction(value: float, option: str) -> None:
    """A WorkloadError unless 0 <= value <= 1."""
    if not 0.0 <= value <= 1.0:
        raise WorkloadError(f"{option} must be in [0, 1], got {value}")


def parse_token_range(text: str) -> tuple[int, int]:
    """`LO:HI` -> (lo, hi): token ids are drawn from [lo, hi), 0 <= lo < hi."""
    lo, hi = _split_range(text, "--token-range", "LO < HI")
    if lo < 0 or lo >= hi:
        raise WorkloadError(f"--token-range {text!r}: need 0 <= LO < HI")
    return lo, hi


def check_length_range(lengths: tuple[int, int], option: str) -> None:
    """A WorkloadError unless (lo, hi) is a range of lengths 1 <= lo <= hi."""
    lo, hi = lengths
    if lo < 1 or lo > hi:
        raise WorkloadError(f"{option} {lo}:{hi}: need 1 <= LO <= HI")


def parse_length_range(text: str, option: str) -> tuple[int, int]:
    """`LO:HI` -> (lo, hi): lengths drawn uniformly from [lo, hi] (both included), 1 <= lo <= hi."""
    lengths = _split_range(text, option, "1 <= LO <= HI")
    check_length_range(lengths, option)
    return lengths


def make_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """A PCG64 generator for (seed, stream name, keys): independent streams per workload and item."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), *keys])


def random_tokens(rng: np.random.Generator, n: int, token_range: tuple[int, int]) -> tuple[int, ...]:
    """`n` token ids drawn uniformly from [lo, hi)."""
    return tuple(rng.integers(token_range[0], token_range[1], size=n).tolist())


def given(value: int | None, default: int) -> int:
    """An option whose default depends on the workload: its value, or `default` when not given."""
    return default if value is None else value


def spread_evenly(fraction: float, phase: float) -> Iterator[bool]:
    """Endless: whether request i belongs to a `fraction` share of the requests spread evenly (i is
    in when floor((i + 1 + phase) * fraction) moves past floor((i + phase) * fraction), `phase` a
    seeded number in [0, 1)): any n consecutive requests hold n * fraction of them, rounded either way,
    so a short run does not get, by chance, 1 or 8 where 3.6 were asked for."""
    for i in itertools.count():
        yield math.floor((i + 1 + phase) * fraction) > math.floor((i + phase) * fraction)
