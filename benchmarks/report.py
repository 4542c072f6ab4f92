"""Benchmark reports in the format of BENCHMARKS.md: a readable table and optional JSON."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    metric: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    higher_is_better: bool = True
    """Rates: ratio = value / baseline; times: ratio = baseline / value (higher is always better)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.value / self.baseline_value if self.baseline_value else float("inf")
        return self.baseline_value / self.value if self.value else float("inf")

    def to_json(self) -> dict:
        d = {"metric": self.metric, "value": round(self.value, 4), "unit": self.unit,
             "baseline": self.baseline, "baseline_value": round(self.baseline_value, 4),
             "ratio": round(self.ratio, 3)}
        d.update(self.extra)
        return d


def environment() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "torch": torch.__version__.split("+")[0],
            "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}


def cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def render(name: str, config: dict, results: list[Result]) -> str:
    lines = [f"benchmark: {name}", "config: " + json.dumps(config)]
    header = f"{'metric':<34} {'value':>12} {'unit':<8} {'baseline':<34} {'baseline_value':>14} {'ratio':>7}"
    lines += [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.metric:<34} {r.value:>12.3f} {r.unit:<8} {r.baseline:<34} {r.baseline_value:>14.3f} "
                     f"{r.ratio:>7.2f}")
    return "\n".join(lines)


def write_json(path: str, name: str, config: dict, results: list[Result]) -> None:
    doc = {"benchmark": name, "config": config, "environment": environment(),
           "results": [r.to_json() for r in results]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def metric_list_type(valid: tuple[str, ...]):
    """An argparse type for `--metrics a,b`: the names, each one of `valid`."""
    import argparse

    def parse(text: str) -> list[str]:
        names = [m.strip() for m in text.split(",") if m.strip()]
        bad = [m for m in names if m not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}; valid: {', '.join(valid)}")
        return names

    return parse
