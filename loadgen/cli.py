"""`kvweave loadgen`: drive a kvweave router (gRPC) or any OpenAI-compatible server with a workload and
report vLLM-style serving metrics; `kvweave loadgen compare A.json B.json` sets two runs side by side.

Exit status: 0 after a run; 1 when the target cannot be reached or no request succeeded (or a
result file for `compare` is bad); 2 for invalid options or workload files; 130 / 143 when stopped by
SIGINT / SIGTERM (the summary, --json and --plot still cover what was measured).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import dataclass

from kvweave.config_flags import add_config_args, config_kwargs
from loadgen.backends import Backend, BackendError, SendOptions, TargetConfig, backend_for
from loadgen.report import ReportConfig, ReportError, build_result, format_comparison, format_summary, load_result, write_json
from loadgen.runner import DEFAULT_NUM_REQUESTS, RunConfig, Runner
from loadgen.stats import compute_stats
from loadgen.types import Workload

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
_NOT_CONFIG = {"func", "command", "loadgen_command", "log_level", "api_key"}
"""Namespace entries left out of the result's "config" (the API key is a secret)."""
FLAG_GROUPS: tuple[tuple[str, type], ...] = (("target", TargetConfig), ("load", RunConfig),
                                             ("sampling", SendOptions), ("report", ReportConfig))
"""--help's argument group of each config dataclass of a run (the workloads' groups follow)."""
CLI_DEFAULTS = {"num_requests": None}
"""Where the command's defaults differ from the dataclasses': without --num-requests a run sends
DEFAULT_NUM_REQUESTS requests, or has no limit when --duration is given."""


@dataclass(frozen=True)
class LoadgenConfig:
    """Everything a `kvweave loadgen` run was asked for, but the workload (built from the same flags)."""

    target: TargetConfig
    run: RunConfig
    send: SendOptions
    report: ReportConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    from loadgen.workloads import add_workload_arguments

    p = sub.add_parser(
        "loadgen", help="load-test a kvweave router or an OpenAI-compatible server",
        usage="kvweave loadgen [options]\n       kvweave loadgen compare A.json B.json",
        description="Send a workload to a kvweave router (gRPC) or any OpenAI-compatible server and report "
                    "TTFT, TPOT, ITL, end-to-end latency, throughput, goodput, errors by kind and the cache "
                    "reuse the server reports, under vLLM benchmark_serving's names. Requests are never "
                    "retried, so every failure is counted. `kvweave loadgen compare A.json B.json` compares "
                    "two runs.")
    for title, cls in FLAG_GROUPS:  # the command line only, no KVWEAVE_* variables: see kvweave.config_flags
        add_config_args(p.add_argument_group(title), cls, defaults=CLI_DEFAULTS, env=False)
    add_workload_arguments(p)
    p.set_defaults(func=run)

    lsub = p.add_subparsers(dest="loadgen_command", metavar="compare")
    c = lsub.add_parser("compare", help="compare two --json results side by side",
                        description="Print two runs' metrics side by side with the ratio B/A and which is "
                                    "better (lower latency, higher throughput).")
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    c.set_defaults(func=compare)


def config_from_args(args: argparse.Namespace) -> LoadgenConfig:
    """The run's config from parsed flags; ValueError naming the flag for a bad value."""
    run_kwargs = config_kwargs(RunConfig, args)
    if run_kwargs["num_requests"] is None and run_kwargs["duration"] is None:
        run_kwargs["num_requests"] = DEFAULT_NUM_REQUESTS
    return LoadgenConfig(target=TargetConfig(**config_kwargs(TargetConfig, args)), run=RunConfig(**run_kwargs),
                         send=SendOptions(**config_kwargs(SendOptions, args)),
                         report=ReportConfig(**config_kwargs(ReportConfig, args)))


def compare(args: argparse.Namespace) -> int:
    try:
        a, b = load_result(args.a), load_result(args.b)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_comparison(a, b, args.a, args.b))
    return 0


def _config(args: argparse.Namespace) -> dict:
    """The options of the run, JSON-safe (infinite numbers as "inf")."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
            for k, v in vars(args).items() if k not in _NOT_CONFIG}


def run(args: argparse.Namespace) -> int:
    from loadgen.workloads import build_workload

    try:
        config = config_from_args(args)
        workload = build_workload(args)
        backend = backend_for(config.target, config.send)
    except (ValueError, BackendError) as e:  # WorkloadError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, workload, backend, config))


async def _run(args: argparse.Namespace, workload: Workload, backend: Backend, config: LoadgenConfig) -> int:
    run_config, report = config.run, config.report
    try:
        try:
            model = await backend.connect()
        except BackendError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"workload: {workload.name}" + (f" ({workload.summary})" if getattr(workload, "summary", "") else ""))
        if getattr(workload, "skipped", 0):
            print(f"skipped {workload.skipped} trace records longer than --max-input-len")
        print(f"target: {backend.name} {backend.url}, model {model}")
        runner = Runner(workload, backend, run_config, log=print)
        try:
            result = await runner.run()
        except ValueError as e:  # a WorkloadError while reading sessions, or settings that cannot run
            print(f"error: {e}", file=sys.stderr)
            return 2
    finally:
        await backend.close()
    slos = report.slos()
    stats = compute_stats(result.records, start=result.start, duration=result.duration,
                          percentiles=report.metric_percentiles, goodput=slos or None)
    doc = build_result(stats, label=report.label, backend=backend.name, model=model,
                       num_requests=run_config.num_requests, request_rate=run_config.request_rate,
                       burstiness=run_config.burstiness, max_concurrency=run_config.max_concurrency,
                       arrivals=result.arrivals, interrupted=result.interrupted, config=_config(args))
    print(format_summary(doc))
    if report.json:
        write_json(report.json, doc)
        print(f"wrote {report.json}")
    if report.plot:
        from loadgen.plots import write_plots

        for path in write_plots(doc, report.plot):
            print(f"wrote {path}")
    if result.interrupted:
        return EXIT_CODES.get(result.interrupted, 130)
    if stats["completed"] == 0 and stats["failed"]:
        print(f"error: no request succeeded ({stats['failed']} failed)", file=sys.stderr)
        return 1
    return 0
