"""The `kvweave` command line (`kvweave COMMAND ...`, or `python -m cli COMMAND ...`).

Subcommands are imported lazily: only the module of the command being run is imported, so
`kvweave router` loads no torch and `kvweave --help` loads nothing. Each module defines
`add_parser(subparsers)`, which adds its subcommand and sets `func` on it (and `skip_teardown`
where the process, run as the program, should end without the interpreter's teardown).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("cli.generate", "generate completions offline (JSONL batch or one prompt)"),
    "worker": ("worker.server", "serve one engine over gRPC and register it in Redis"),
    "router": ("controlplane.router_main", "route requests to workers (gRPC + OpenAI-compatible HTTP)"),
    "route": ("cli.route", "inspect the router's placement decisions (route explain: where a prompt would go)"),
    "serve": ("cli.serve", "start a cluster on this machine: Redis, N workers and the router"),
    "planner": ("cli.planner", "scale the prefill and decode pools toward TTFT and ITL targets"),
    "bench": ("benchmarks", "run a benchmark (reports ratios against a baseline from the same run)"),
    "loadgen": ("loadgen.cli", "load-test a kvweave router or an OpenAI-compatible server"),
}
"""Command -> (module defining add_parser, one-line help shown by `kvweave --help`)."""


def _add_global_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")


def command_in(argv: list[str]) -> str | None:
    """The subcommand `argv` names, if any (what follows the global options)."""
    pre = argparse.ArgumentParser(add_help=False)
    _add_global_args(pre)
    _, rest = pre.parse_known_args(argv)
    return rest[0] if rest and rest[0] in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s full subparser (every command's with "all"); the others are
    listed with their help only."""
    parser = argparse.ArgumentParser(prog="kvweave",
                                     description="kvweave: LLM serving that never computes the same KV twice")
    _add_global_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command in (name, "all"):
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None  # the program's own arguments: not a caller's (tests call main(argv))
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_in(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if from_command_line and getattr(args, "skip_teardown", False):
        from kvweave.serving import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
