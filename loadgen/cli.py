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

from loadgen.arrivals import parse_burstiness, parse_rate
from loadgen.backends import BACKENDS, DEFAULT_URLS, Backend, BackendError, SendOptions, make_backend
from loadgen.report import ReportError, build_result, format_comparison, format_summary, load_result, write_json
from loadgen.runner import RunConfig, Runner
from loadgen.stats import DEFAULT_PERCENTILES, compute_stats, parse_goodput, parse_percentiles
from loadgen.types import Workload

DEFAULT_NUM_REQUESTS = 100
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
_NOT_CONFIG = {"func", "command", "loadgen_command", "log_level", "api_key"}
"""Namespace entries left out of the result's "config" (the API key is a secret)."""


def _number(kind: type, minimum: float, strict: bool):
    """An argparse type: a finite `kind` above (`strict`) or at least `minimum`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value
    return parse


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
    target = p.add_argument_group("target")
    target.add_argument("--backend", choices=BACKENDS, default="grpc",
                        help="grpc: a kvweave router through the SDK; openai: an OpenAI-compatible HTTP server "
                             "(kvweave's router, vLLM, SGLang) (default: grpc)")
    target.add_argument("--url", default=None,
                        help=f"grpc: host:port (default {DEFAULT_URLS['grpc']}); openai: base URL, with or "
                             f"without /v1 (default {DEFAULT_URLS['openai']})")
    target.add_argument("--model", default=None, help="model to ask for (default: the first one the server lists)")
    target.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")

    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=parse_rate, default=None, metavar="R",
                      help="sessions started per second, Poisson (gamma with --burstiness); 'inf' starts all "
                           "at once (default: the trace's timestamps for mooncake and azure, else inf)")
    load.add_argument("--burstiness", type=parse_burstiness, default=1.0, metavar="B",
                      help="gamma shape of the inter-arrival times: 1 is Poisson, < 1 burstier, > 1 smoother "
                           "(default: 1.0)")
    load.add_argument("--max-concurrency", type=_number(int, 1, False), default=None, metavar="C",
                      help="most requests in flight; with an infinite rate also the most sessions in flight "
                           "(default: no limit)")
    load.add_argument("--num-requests", type=_number(int, 1, False), default=None, metavar="N",
                      help=f"requests to send (a multi-turn session's turns count one each) (default: "
                           f"{DEFAULT_NUM_REQUESTS}, or no limit with --duration)")
    load.add_argument("--duration", type=_number(float, 0, True), default=None, metavar="S",
                      help="send no new request after S seconds, then wait for those in flight")
    load.add_argument("--seed", type=_number(int, 0, False), default=0,
                      help="seed of the workload and the arrivals (default: 0)")

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=_number(float, 0, False), default=0.0, help="(default: 0, greedy)")
    sampling.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                          help="generate exactly the asked output lengths (default: on)")
    sampling.add_argument("--request-timeout", type=_number(float, 0, True), default=600.0, metavar="S",
                          help="a request taking longer fails as 'timeout' (default: 600)")

    out = p.add_argument_group("report")
    out.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                     help="SLOs for goodput, any of ttft:MS tpot:MS e2el:MS (requests meeting all of them, "
                          "per second)")
    out.add_argument("--metric-percentiles", type=parse_percentiles, default=list(DEFAULT_PERCENTILES),
                     metavar="P,P,...", help="percentiles reported (default: 50,90,99)")
    out.add_argument("--json", metavar="PATH", help="write the result as JSON (vLLM-compatible keys)")
    out.add_argument("--plot", metavar="DIR", help="write PNG plots: latency CDFs, throughput and TTFT over time")
    out.add_argument("--label", metavar="TEXT", help="name of the run in reports")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_workload_arguments(p)
    p.set_defaults(func=run)

    lsub = p.add_subparsers(dest="loadgen_command", metavar="compare")
    c = lsub.add_parser("compare", help="compare two --json results side by side",
                        description="Print two runs' metrics side by side with the ratio B/A and which is "
                                    "better (lower latency, higher throughput).")
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    c.set_defaults(func=compare)


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

    num_requests = args.num_requests or (None if args.duration else DEFAULT_NUM_REQUESTS)
    try:
        slos = parse_goodput(args.goodput or [])
        config = RunConfig(num_requests=num_requests, duration=args.duration, request_rate=args.request_rate,
                           burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
                           progress=not args.no_progress)
        config.check()
        workload = build_workload(args)
        options = SendOptions(temperature=args.temperature, ignore_eos=args.ignore_eos,
                              request_timeout=args.request_timeout)
        backend = make_backend(args.backend, args.url, model=args.model, api_key=args.api_key, options=options)
    except (ValueError, BackendError) as e:  # WorkloadError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, workload, backend, config, slos))


async def _run(args: argparse.Namespace, workload: Workload, backend: Backend, config: RunConfig,
               slos: dict[str, float]) -> int:
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
        runner = Runner(workload, backend, config, log=print)
        try:
            result = await runner.run()
        except ValueError as e:  # a WorkloadError while reading sessions, or settings that cannot run
            print(f"error: {e}", file=sys.stderr)
            return 2
    finally:
        await backend.close()
    stats = compute_stats(result.records, start=result.start, duration=result.duration,
                          percentiles=args.metric_percentiles, goodput=slos or None)
    doc = build_result(stats, label=args.label, backend=backend.name, model=model, num_requests=config.num_requests,
                       request_rate=args.request_rate, burstiness=args.burstiness,
                       max_concurrency=args.max_concurrency, arrivals=result.arrivals,
                       interrupted=result.interrupted, config=_config(args))
    print(format_summary(doc))
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot:
        from loadgen.plots import write_plots

        for path in write_plots(doc, args.plot):
            print(f"wrote {path}")
    if result.interrupted:
        return EXIT_CODES.get(result.interrupted, 130)
    if stats["completed"] == 0 and stats["failed"]:
        print(f"error: no request succeeded ({stats['failed']} failed)", file=sys.stderr)
        return 1
    return 0
