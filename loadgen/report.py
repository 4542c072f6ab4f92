"""Reports of a run: the JSON result (vLLM benchmark_serving's keys plus kvweave's), the summary
table printed at the end, and the side-by-side comparison of two results (`kvweave loadgen compare`).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kvweave.config_flags import flag
from loadgen.stats import DEFAULT_PERCENTILES, LATENCY_METRICS, parse_goodput, parse_percentiles

WIDTH = 50
_LATENCY_KEY = re.compile(r"^(mean|median|std|p\d+(?:\.\d+)?)_(ttft|tpot|itl|e2el)_ms$")
_TITLES = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}


class ReportError(Exception):
    """A result file cannot be read or is not a loadgen result; the message names the file."""


@dataclass(frozen=True)
class ReportConfig:
    """What a run reports and where (the `report` flags of `kvweave loadgen`)."""

    goodput: list[str] | None = field(default=None, metadata=flag(nargs="+", metavar="KEY:MS", default_text=""))
    """SLOs for goodput, any of ttft:MS tpot:MS e2el:MS (requests meeting all of them, per second)"""
    metric_percentiles: tuple[float, ...] = field(default=DEFAULT_PERCENTILES, metadata=flag(
        parse=parse_percentiles, metavar="P,P,...", default_text=",".join(f"{p:g}" for p in DEFAULT_PERCENTILES)))
    """percentiles reported"""
    json: str | None = field(default=None, metadata=flag(metavar="PATH", default_text=""))
    """write the result as JSON (vLLM-compatible keys)"""
    plot: str | None = field(default=None, metadata=flag(metavar="DIR", default_text=""))
    """write PNG plots: latency CDFs, throughput and TTFT over time"""
    label: str | None = field(default=None, metadata=flag(metavar="TEXT", default_text=""))
    """name of the run in reports"""

    def __post_init__(self) -> None:
        """ValueError naming the flag for a bad SLO or percentile."""
        self.slos()
        if not self.metric_percentiles or any(not 0 <= p <= 100 for p in self.metric_percentiles):
            raise ValueError(f"--metric-percentiles must be numbers in [0, 100], got {self.metric_percentiles}")

    def slos(self) -> dict[str, float]:
        """The goodput SLOs in ms by key (ttft, tpot, e2el); empty without --goodput."""
        return parse_goodput(self.goodput or [])


def build_result(stats: dict, *, label: str | None, backend: str, model: str, num_requests: int | None,
                 request_rate: float | None, burstiness: float, max_concurrency: int | None,
                 arrivals: str, interrupted: str | None, config: dict) -> dict:
    """The JSON document of a run: what ran (top-level keys as vLLM writes them, and `config` with
    the workload and every option), then the metrics of `stats`."""
    rate = "inf" if request_rate is None or math.isinf(request_rate) else request_rate
    return {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "label": label, "backend": backend,
            "model_id": model, "num_prompts": num_requests, "request_rate": rate, "burstiness": burstiness,
            "max_concurrency": max_concurrency, "arrivals": arrivals, "interrupted": interrupted,
            "config": config} | stats


def write_json(path: str | os.PathLike, result: dict) -> None:
    """Write `result` to `path` atomically (a reader never sees half a file); makes parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_result(path: str | os.PathLike) -> dict:
    """A result written by `--json`; raises ReportError for a missing, unreadable or foreign file."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(result, dict) or not all(isinstance(result.get(k), (int, float))
                                               for k in ("completed", "duration", "request_throughput")):
        raise ReportError(f"{path}: not a loadgen result (expected an object with 'completed', 'duration' and "
                          "'request_throughput', as `kvweave loadgen --json` writes)")
    return result


def _percentile_names(result: dict) -> list[str]:
    """The pNN stat names in `result` (e.g. ["p50", "p90", "p99"]), in increasing order."""
    names = {m.group(1) for m in map(_LATENCY_KEY.match, result) if m and m.group(1).startswith("p")}
    return sorted(names, key=lambda p: float(p[1:]))


def _row(name: str, value, fmt: str = "") -> str:
    return f"{name:<40} {value:<10{fmt}}"


def _latency_rows(stats: dict, metric: str) -> list[str]:
    """Mean, median and every percentile of `metric` in `stats` (a result or one group of it)."""
    short = _TITLES[metric][0]
    return ([_row(f"Mean {short} (ms):", stats[f"mean_{metric}_ms"], ".2f"),
             _row(f"Median {short} (ms):", stats[f"median_{metric}_ms"], ".2f")]
            + [_row(f"P{p[1:]} {short} (ms):", stats[f"{p}_{metric}_ms"], ".2f") for p in _percentile_names(stats)])


def _group_lines(title: str, groups: dict) -> list[str]:
    """A section per group of requests that has any (`latency_by_prefill`, `latency_by_class`)."""
    lines = []
    for name, group in groups.items():
        if group["completed"]:
            heading = f"{title} {name} ({group['completed']} requests)"
            lines.append(f"{heading:-^{WIDTH}}")
            lines += [row for metric in LATENCY_METRICS for row in _latency_rows(group, metric)]
    return lines


def _count_lines(title: str, counts: dict) -> list[str]:
    return [f"{title:-^{WIDTH}}", *(_row(f"{name}:", count) for name, count in counts.items())] if counts else []


def _disaggregation_lines(result: dict) -> list[str]:
    """Prefill/decode decisions, remote / local latency and requests per prefill worker (none
    without disaggregation)."""
    if not result.get("requests_by_disaggregation"):
        return []
    return (_count_lines("Prefill/decode decisions", result["requests_by_disaggregation"])
            + _group_lines("Prefill", result.get("latency_by_prefill") or {})
            + _count_lines("Successful requests per prefill worker", result.get("requests_by_prefill_worker") or {}))


def format_summary(result: dict) -> str:
    """vLLM's "Serving Benchmark Result" table, plus cache reuse, prefill/decode disaggregation,
    requests per worker, latency per workload class, images sent and errors by kind."""
    lines = [f"{' Serving Benchmark Result ':=^{WIDTH}}"]

    def row(name: str, value, fmt: str = "") -> None:
        lines.append(_row(name, value, fmt))

    if result.get("label"):
        row("Run:", result["label"])
    row("Successful requests:", result["completed"])
    row("Failed requests:", result.get("failed", 0))
    if result.get("max_concurrency") is not None:
        row("Maximum request concurrency:", result["max_concurrency"])
    if isinstance(result.get("request_rate"), (int, float)):
        row("Request rate configured (RPS):", result["request_rate"], ".2f")
    row("Benchmark duration (s):", result["duration"], ".2f")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"], ".2f")
    if result.get("request_goodput") is not None:
        row("Request goodput (req/s):", result["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", result["output_throughput"], ".2f")
    row("Total Token throughput (tok/s):", result["total_token_throughput"], ".2f")
    for metric in LATENCY_METRICS:
        lines.append(f"{_TITLES[metric][1]:-^{WIDTH}}")
        lines += _latency_rows(result, metric)
    lines.append(f"{'KV Cache Reuse (server-reported)':-^{WIDTH}}")
    row("Prefix-cached tokens:", f"{result.get('total_cached_tokens', 0)} "
                                 f"({result.get('prefix_reuse_ratio', 0.0):.1%} of input)")
    row("Chunk-reused tokens:", f"{result.get('total_chunk_reused_tokens', 0)} "
                                f"({result.get('chunk_reuse_ratio', 0.0):.1%} of input)")
    row("Recomputed tokens:", result.get("total_recomputed_tokens", 0))
    lines += _disaggregation_lines(result)
    decode = " decode" if result.get("requests_by_disaggregation") else ""
    lines += _count_lines(f"Successful requests per{decode} worker", result.get("requests_by_worker") or {})
    lines += _group_lines("Class", result.get("latency_by_class") or {})
    if "images_sent" in result:
        lines += _count_lines("Images", {"Images sent": result["images_sent"],
                                         "Distinct images": result["distinct_images"]})
    lines += _count_lines("Errors", result.get("errors_by_kind") or {})
    if result.get("interrupted"):
        lines.append(f"interrupted by {result['interrupted']}: partial results")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- compare

HIGHER_IS_BETTER = ("completed", "request_throughput", "request_goodput", "output_throughput",
                    "total_token_throughput", "prefix_reuse_ratio", "chunk_reuse_ratio")
LOWER_IS_BETTER = ("failed",)
NEUTRAL = ("duration", "total_input_tokens", "total_output_tokens", "total_cached_tokens",
           "total_chunk_reused_tokens", "total_recomputed_tokens")


def _compared_metrics(a: dict, b: dict) -> list[tuple[str, bool | None]]:
    """(key, higher is better; None: neither) for every metric both results have."""
    stats = ["mean", "median", *_percentile_names(a)]
    latency = [f"{s}_{m}_ms" for m in LATENCY_METRICS for s in stats]
    rows = ([(k, True) for k in HIGHER_IS_BETTER[:5]] + [(k, False) for k in LOWER_IS_BETTER]
            + [(k, False) for k in latency] + [(k, True) for k in HIGHER_IS_BETTER[5:]] + [(k, None) for k in NEUTRAL])
    return [(k, better) for k, better in rows
            if isinstance(a.get(k), (int, float)) and isinstance(b.get(k), (int, float))]


def _number(value: float) -> str:
    return f"{value:d}" if isinstance(value, int) else f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"


def format_comparison(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Two results side by side: each metric, its ratio B/A and which run is better."""
    name_a, name_b = a.get("label") or name_a, b.get("label") or name_b
    lines = [f"A: {name_a}", f"B: {name_b}",
             f"{'metric':<28} {'A':>12} {'B':>12} {'B/A':>8}  better"]
    for key, higher in _compared_metrics(a, b):
        va, vb = a[key], b[key]
        ratio = f"{vb / va:.3f}" if va else "-"
        if higher is None or va == vb:
            better = "" if higher is None else "="
        else:
            better = "B" if (vb > va) == higher else "A"
        lines.append(f"{key:<28} {_number(va):>12} {_number(vb):>12} {ratio:>8}  {better}")
    return "\n".join(lines)
