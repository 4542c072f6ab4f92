"""`kvweave bench NAME`: benchmarks that measure their baseline in the same run."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from benchmarks import disagg, engine, epd, kvstore, planner, rag, router_cli, serve, soak, tp

    p = sub.add_parser("bench", help="run a benchmark (reports ratios against a baseline from the same run)")
    bsub = p.add_subparsers(dest="bench_name", metavar="NAME", required=True)
    engine.add_parser(bsub)
    router_cli.add_parser(bsub)
    kvstore.add_parser(bsub)
    rag.add_parser(bsub)
    disagg.add_parser(bsub)
    soak.add_parser(bsub)
    serve.add_parser(bsub)
    tp.add_parser(bsub)
    planner.add_parser(bsub)
    epd.add_parser(bsub)
