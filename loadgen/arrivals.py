"""When sessions start: a Poisson process (or gamma, for burstier or smoother traffic), as vLLM's
benchmark_serving draws it, or all at once when the rate is infinite.

Inter-arrival times are gamma-distributed with shape `burstiness` and mean 1/rate: burstiness 1 is a
Poisson process (exponential gaps, coefficient of variation 1); below 1 the traffic is burstier
(CV = 1/sqrt(burstiness) > 1), above 1 it is more regular.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Iterator

import numpy as np


def parse_rate(text: str) -> float:
    """argparse type of --request-rate: a positive number of requests per second, or "inf"."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of requests per second or 'inf', "
                                         f"got {text!r}") from None
    if math.isnan(rate) or rate <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or 'inf' to send everything at once), got {text!r}")
    return rate


def parse_burstiness(text: str) -> float:
    """argparse type of --burstiness: a finite positive number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


class ArrivalProcess:
    """Seeded inter-arrival gaps (seconds) with mean 1/`rate` and gamma shape `burstiness`."""

    def __init__(self, rate: float = math.inf, burstiness: float = 1.0, seed: int = 0) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if not (math.isfinite(burstiness) and burstiness > 0):
            raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
        self.rate, self.burstiness = rate, burstiness
        self._rng = np.random.default_rng(seed)

    def gaps(self) -> Iterator[float]:
        """Endless gaps between consecutive arrivals (all 0 for an infinite rate)."""
        if math.isinf(self.rate):
            while True:
                yield 0.0
        scale = 1.0 / (self.rate * self.burstiness)
        while True:
            yield float(self._rng.gamma(shape=self.burstiness, scale=scale))

    def describe(self) -> str:
        if math.isinf(self.rate):
            return "all at once (infinite request rate)"
        kind = "Poisson" if self.burstiness == 1.0 else f"gamma (burstiness {self.burstiness:g})"
        return f"{kind} arrivals at {self.rate:g} sessions/s"
