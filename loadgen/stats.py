"""Run metrics from request records, under vLLM benchmark_serving's key names.

Latency figures are in milliseconds: `mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms` (population
standard deviation, as `np.std`), `p99_ttft_ms` (linear interpolation, as `np.percentile`), and the
same for `tpot` (per request (e2e - ttft) / (output tokens - 1), requests with more than one output
token), `itl` (every gap between streamed pieces) and `e2el` (end to end). Latencies and token
totals count successful requests only; failures are counted by kind.

With prefill/decode disaggregation (the server reports its decision per request), the result also
has `requests_by_disaggregation` (decision -> requests), `requests_by_prefill_worker` (requests
prefilled remotely, per prefill worker; `requests_by_worker` counts them by the worker that decoded)
and `latency_by_prefill`: {"remote": ..., "local": ...}, the TTFT, TPOT, ITL and end-to-end figures
(keys as above, plus `completed`) of the requests prefilled on another worker and of those that
stayed on one. When the sessions carry a `class` tag (the mixed and multimodal workloads),
`latency_by_class` gives the same per class. When they carry an `images` tag (the indices of the
images a request sends: the multimodal workload), `images_sent` counts the images of every request
sent and `distinct_images` the different ones among them.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from loadgen.records import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
REMOTE = "remote"
"""The disaggregation decision of requests prefilled on another worker."""


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """SLOs from vLLM's `--goodput KEY:MS ...` syntax (keys ttft, tpot, e2el; values in ms, >= 0).
    Raises ValueError naming the bad item."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"invalid --goodput {item!r}: expected KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)} "
                             "(e.g. ttft:500 tpot:50)")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"invalid --goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not math.isfinite(ms) or ms < 0:
            raise ValueError(f"invalid --goodput {item!r}: the SLO must be a finite number of ms >= 0")
        if key in slos:
            raise ValueError(f"invalid --goodput: {key} is given twice")
        slos[key] = ms
    return slos


def parse_percentiles(text: str) -> list[float]:
    """argparse type of --metric-percentiles: comma-separated numbers in [0, 100]."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 50,90,99, got {text!r}") from None
    if not values or any(not 0 <= p <= 100 for p in values):
        raise argparse.ArgumentTypeError(f"percentiles must be numbers in [0, 100], got {text!r}")
    return values


def percentile_key(p: float) -> str:
    """vLLM's spelling: 99 -> "p99", 99.9 -> "p99.9"."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def tpot(record: RequestRecord) -> float | None:
    """Seconds per output token after the first, or None for requests with fewer than two tokens."""
    if record.output_tokens <= 1:
        return None
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO (ms); a 1-token request meets any TPOT SLO."""
    per_token = tpot(record)
    values = {"ttft": record.ttft * 1000, "e2el": record.latency * 1000,
              "tpot": 0.0 if per_token is None else per_token * 1000}
    return all(values[key] <= limit for key, limit in slos.items())


def _summary(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std/pNN of `values_s` (seconds) in ms; all 0 for no values, as vLLM reports."""
    ms = np.asarray(values_s, dtype=float) * 1000 if len(values_s) else np.zeros(1)
    out = {f"mean_{name}_ms": float(np.mean(ms)), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(np.std(ms))}
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def _series(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """The values (seconds) of each latency metric over successful `records`."""
    return {"ttft": [r.ttft for r in records], "tpot": [t for t in map(tpot, records) if t is not None],
            "itl": [gap for r in records for gap in r.itls], "e2el": [r.latency for r in records]}


def _group(records: Sequence[RequestRecord], percentiles: Sequence[float]) -> dict:
    """`completed` and the latency figures of one group of successful requests."""
    series = _series(records)
    out: dict = {"completed": len(records)}
    for name in LATENCY_METRICS:
        out |= _summary(name, series[name], percentiles)
    return out


def disaggregation_stats(ok: Sequence[RequestRecord], percentiles: Sequence[float]) -> dict:
    """Decisions, prefill workers and remote / local latency of successful requests; {} when the
    server reported no disaggregation decision."""
    decided = [r for r in ok if r.disaggregation]
    if not decided:
        return {}
    prefill_workers = Counter(r.prefill_worker_id for r in decided if r.prefill_worker_id)
    return {
        "requests_by_disaggregation": dict(Counter(r.disaggregation for r in decided).most_common()),
        "requests_by_prefill_worker": dict(sorted(prefill_workers.items())),
        "latency_by_prefill": {
            "remote": _group([r for r in decided if r.disaggregation == REMOTE], percentiles),
            "local": _group([r for r in decided if r.disaggregation != REMOTE], percentiles)},
    }


def class_stats(records: Sequence[RequestRecord], percentiles: Sequence[float]) -> dict:
    """Latency per workload class (the sessions' `class` tag) of the successful requests, for every
    class sent (one whose requests all failed has `completed` 0); {} without classes."""
    classes = sorted({r.tags["class"] for r in records if "class" in r.tags})
    if not classes:
        return {}
    return {"latency_by_class": {c: _group([r for r in records if r.ok and r.tags.get("class") == c], percentiles)
                                 for c in classes}}


def image_stats(records: Sequence[RequestRecord]) -> dict:
    """`images_sent` and `distinct_images` over the requests sent (the sessions' `images` tags); {}
    when no session carries one."""
    tagged = [r.tags["images"] for r in records if "images" in r.tags]
    if not tagged:
        return {}
    return {"images_sent": sum(map(len, tagged)), "distinct_images": len({i for images in tagged for i in images})}


def compute_stats(records: Sequence[RequestRecord], *, start: float, duration: float,
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                  goodput: dict[str, float] | None = None) -> dict:
    """The run's metrics from its records (`start`: perf_counter at the beginning of the run,
    `duration`: seconds the run took). `request_goodput` is None unless `goodput` SLOs are given."""
    ok = [r for r in records if r.ok]
    duration = max(duration, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    chunk_reused = sum(r.chunk_reused_tokens for r in ok)
    good = sum(meets_slos(r, goodput) for r in ok) if goodput else None
    result: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": None if good is None else good / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    series = _series(ok)
    for name in LATENCY_METRICS:
        result |= _summary(name, series[name], percentiles)
    result |= {
        "errors_by_kind": dict(Counter(r.error for r in records if not r.ok).most_common()),
        "total_cached_tokens": cached,
        "total_chunk_reused_tokens": chunk_reused,
        "total_recomputed_tokens": sum(r.recomputed_tokens for r in ok),
        "prefix_reuse_ratio": cached / total_in if total_in else 0.0,
        "chunk_reuse_ratio": chunk_reused / total_in if total_in else 0.0,
        "requests_by_worker": dict(sorted(Counter(r.worker_id for r in ok if r.worker_id).items())),
        "input_lens": [r.prompt_tokens for r in records],
        "output_lens": [r.output_tokens if r.ok else 0 for r in records],
        "ttfts": [r.ttft if r.ok else 0.0 for r in records],
        "itls": [list(r.itls) if r.ok else [] for r in records],
        "e2els": [r.latency if r.ok else 0.0 for r in records],
        "start_times": [r.start - start for r in records],
        "errors": ["" if r.ok else f"{r.error}: {r.message}" for r in records],
        "worker_ids": [r.worker_id or "" for r in records],
    }
    return result | disaggregation_stats(ok, percentiles) | class_stats(records, percentiles) | image_stats(records)
