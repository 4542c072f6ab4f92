"""The arrival process: Poisson by default, gamma with --burstiness, all at once for an infinite
rate, seeded; and the option parsers that reject what cannot run."""
from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import pytest

from loadgen.arrivals import ArrivalProcess, parse_burstiness, parse_rate

DRAWS = 40_000


def gaps(rate: float, burstiness: float = 1.0, seed: int = 0, n: int = DRAWS) -> np.ndarray:
    return np.fromiter(itertools.islice(ArrivalProcess(rate, burstiness, seed).gaps(), n), dtype=float)


def cv(x: np.ndarray) -> float:
    return float(np.std(x) / np.mean(x))


def test_poisson_mean_rate_and_exponential_gaps() -> None:
    g = gaps(rate=5.0)
    assert DRAWS / g.sum() == pytest.approx(5.0, rel=0.03)
    assert cv(g) == pytest.approx(1.0, rel=0.05)  # exponential gaps
    assert np.mean(g < 0.2) == pytest.approx(1 - math.exp(-1), abs=0.01)  # P(gap < mean)


@pytest.mark.parametrize(("burstiness", "expected_cv"), [(0.25, 2.0), (4.0, 0.5)])
def test_burstiness_changes_the_spread_not_the_rate(burstiness: float, expected_cv: float) -> None:
    g = gaps(rate=2.0, burstiness=burstiness)
    assert DRAWS / g.sum() == pytest.approx(2.0, rel=0.04)
    assert cv(g) == pytest.approx(expected_cv, rel=0.06)  # gamma: CV = 1/sqrt(shape)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert set(gaps(math.inf, n=100)) == {0.0}
    assert "all at once" in ArrivalProcess().describe()
    assert "Poisson" in ArrivalProcess(3).describe() and "burstiness 0.5" in ArrivalProcess(3, 0.5).describe()


def test_seeded_and_deterministic() -> None:
    assert np.array_equal(gaps(3.0, 0.7, seed=1, n=50), gaps(3.0, 0.7, seed=1, n=50))
    assert not np.array_equal(gaps(3.0, seed=1, n=50), gaps(3.0, seed=2, n=50))


def test_invalid_processes_are_refused() -> None:
    for rate, burstiness in ((0, 1), (-1, 1), (float("nan"), 1), (1, 0), (1, -2), (1, math.inf)):
        with pytest.raises(ValueError):
            ArrivalProcess(rate, burstiness)


def test_parse_rate() -> None:
    assert parse_rate("inf") == math.inf and parse_rate("2.5") == 2.5
    for bad, says in (("0", "> 0"), ("-3", "> 0"), ("nan", "> 0"), ("abc", "positive number")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse_rate(bad)


def test_parse_burstiness() -> None:
    assert parse_burstiness("0.5") == 0.5
    for bad in ("0", "-1", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_burstiness(bad)
