"""`kvweave generate`: offline batch generation from a JSONL file, or one prompt."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvweave.config_flags import add_config_args, config_kwargs
from kvweave.sampling_params import SamplingParams

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "logprobs", "min_tokens")
"""The SamplingParams fields an input line may set."""
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
"""The SamplingParams fields with a flag: the defaults of lines that do not set them."""
SAMPLING_DEFAULTS = {"max_tokens": 128, "temperature": 0.0}
"""Where generate's defaults differ from SamplingParams': greedy, longer outputs."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from worker.engine_args import add_engine_args

    p = sub.add_parser(
        "generate", help="generate completions offline (JSONL batch or one prompt)",
        description="Each input line is {\"prompt\": str} or {\"messages\": [...]} plus optional sampling fields "
                    f"({', '.join(SAMPLING_FIELDS)}). Each output line is the input's fields plus \"text\", "
                    "\"token_ids\", \"finish_reason\" and \"num_prompt_tokens\" (or \"error\"). All lines are "
                    "batched together.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="JSONL file of requests")
    src.add_argument("--prompt", help="one prompt; the completion streams to stdout")
    p.add_argument("--output", help="JSONL file for the results (default: stdout)")
    p.add_argument("--chat", action="store_true", help="with --prompt: send it as a user chat message")
    # request defaults, not process settings: the command line only (see kvweave.config_flags)
    add_config_args(p.add_argument_group("sampling (defaults of the lines that do not set the field)"),
                    SamplingParams, only=SAMPLING_FLAGS, defaults=SAMPLING_DEFAULTS, env=False)
    add_engine_args(p)
    p.set_defaults(func=run)


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    return config_kwargs(SamplingParams, args, only=SAMPLING_FLAGS)


def _parse_line(lineno: int, line: str) -> tuple[dict | None, str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"line {lineno}: invalid JSON: {e.msg} at column {e.colno}"
    if not isinstance(obj, dict):
        return None, f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
    if "prompt" not in obj and "messages" not in obj:
        return obj, f"line {lineno}: needs \"prompt\" or \"messages\""
    return obj, None


def _add(engine, obj: dict, defaults: dict) -> str:
    fields = {**defaults, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj}}
    prompt = {"messages": obj["messages"]} if "messages" in obj else obj["prompt"]
    return engine.add_request(prompt, SamplingParams(**fields))


def run_batch(engine, lines: list[str], defaults: dict) -> tuple[list[dict], list[str]]:
    """Run all valid lines together; returns one result per non-blank input line and the errors."""
    results: list[dict] = []
    errors: list[str] = []
    pending: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj, err = _parse_line(lineno, line)
        if err is None:
            try:
                pending[_add(engine, obj, defaults)] = len(results)
            except (ValueError, TypeError) as e:
                err = f"line {lineno}: {e}"
        results.append(obj if err is None else {**(obj or {}), "error": err})
        if err:
            errors.append(err)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                r = results[pending[out.req_id]]
                r.update(text=out.text, token_ids=out.token_ids, finish_reason=out.finish_reason,
                         num_prompt_tokens=out.num_prompt_tokens)
    return results, errors


def _stream_one(engine, args: argparse.Namespace) -> int:
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else args.prompt
    engine.add_request(prompt, SamplingParams(**_defaults(args)))
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from worker.config import ConfigError
    from worker.engine import LLMEngine
    from worker.engine_args import engine_config_from_args
    from kvweave.errors import InvalidRequestError

    try:
        SamplingParams(**_defaults(args))  # a bad flag fails once, before the model loads
    except InvalidRequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.input:
        try:
            with open(args.input, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            print(f"error: cannot read --input: {e}", file=sys.stderr)
            return 2
    try:
        engine = LLMEngine(engine_config_from_args(args))
        if args.prompt is not None:
            return _stream_one(engine, args)
    except (ConfigError, InvalidRequestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, errors = run_batch(engine, lines, _defaults(args))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} of {len(results)} lines failed", file=sys.stderr)
        return 1
    return 0
