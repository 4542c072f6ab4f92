"""PNG plots of a run result (`--plot DIR`), drawn with matplotlib's Agg backend (no display needed):

- latency_cdf.png: empirical CDFs of TTFT, TPOT, ITL and end-to-end latency (ms);
- throughput.png: completed requests and output tokens per second, in 1-s bins of completion time;
- ttft_over_time.png: each request's TTFT against when it was sent.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _series(result: dict) -> dict[str, np.ndarray]:
    """Per-request arrays of the successful requests (seconds; output tokens)."""
    ok = np.array([not e for e in result["errors"]], dtype=bool)

    def pick(key: str) -> np.ndarray:
        return np.asarray(result[key], dtype=float)[ok]

    out = {"start": pick("start_times"), "ttft": pick("ttfts"), "e2el": pick("e2els"), "output": pick("output_lens")}
    many = out["output"] > 1
    out["tpot"] = (out["e2el"][many] - out["ttft"][many]) / (out["output"][many] - 1)
    out["itl"] = np.asarray([gap for gaps, good in zip(result["itls"], ok) if good for gap in gaps], dtype=float)
    return out


def write_plots(result: dict, folder: str | os.PathLike) -> list[Path]:
    """Draw the plots of `result` (as `--json` writes it) into `folder`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = _series(result)
    title = result.get("label") or "kvweave loadgen"
    written = []

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))
    for ax, (key, name) in zip(axes.flat, panels):
        values = np.sort(s[key]) * 1000
        if len(values):
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests" if key != "itl" else "fraction of gaps",
               ylim=(0, 1.02), title=f"{name} CDF")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    written.append(_save(fig, folder / "latency_cdf.png"))

    ends = s["start"] + s["e2el"]
    bins = np.arange(0, max(1.0, float(np.ceil(ends.max()))) + 1 if len(ends) else 2)
    requests, _ = np.histogram(ends, bins=bins)
    tokens, _ = np.histogram(ends, bins=bins, weights=s["output"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.bar(bins[:-1], requests, width=1.0, align="edge")
    top.set(ylabel="completed requests/s", title=title)
    bottom.bar(bins[:-1], tokens, width=1.0, align="edge", color="tab:orange")
    bottom.set(xlabel="time since start (s)", ylabel="output tokens/s")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    written.append(_save(fig, folder / "throughput.png"))

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.scatter(s["start"], s["ttft"] * 1000, s=8)
    ax.set(xlabel="request sent at (s since start)", ylabel="TTFT (ms)", title=f"{title}: TTFT over time")
    ax.grid(alpha=0.3)
    written.append(_save(fig, folder / "ttft_over_time.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
