"""The `kvweave` command line."""
from __future__ import annotations

import argparse
import logging
import sys

import importlib

# Each module defines add_parser(subparsers) and sets `func` on its subcommand.
COMMAND_MODULES = ("kvweave.generate_cmd", "worker.server", "controlplane.router_main", "controlplane.serve",
                   "kvweave.bench", "loadgen.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvweave", description="kvweave: LLM serving that never computes the same KV twice")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
