"""`kvweave route explain`: where the running router would place a prompt, and why, without sending it.

Asks the router's `POST /v1/route/explain` (controlplane/explain.py) with the same body a completion
(`--prompt`, `--chunk` for reusable chunks) or a chat (`--messages`) would have, authenticated with
`--api-key` (or $KVWEAVE_API_KEY) as every other call, and prints each candidate worker's predicted
prompt tokens by source (its own device, DRAM and SSD tiers, or a peer), its load and its cost, the
chosen worker marked. Exit status: 0, 1 when the router refused or could not be reached (its error
message printed), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

SOURCES = ("device", "dram", "ssd", "peer")
API_KEY_ENV = "KVWEAVE_API_KEY"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route", help="inspect the router's placement decisions",
                       description="Inspect the running router's placement decisions.")
    route_sub = p.add_subparsers(dest="route_command", metavar="ROUTE_COMMAND", required=True)
    e = route_sub.add_parser("explain", help="print where the router would place a prompt, without sending it",
                             description="Print the worker the router would choose for a prompt now, with every "
                                         "candidate's predicted prompt tokens by tier, load and cost. Nothing is "
                                         "sent to a worker.")
    e.add_argument("--url", default="http://127.0.0.1:8000", help="the router's HTTP address (default %(default)s)")
    e.add_argument("--api-key", default=None, help=f"API key (default: ${API_KEY_ENV}; none without it)")
    prompt = e.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="a text prompt (as POST /v1/completions' prompt)")
    prompt.add_argument("--messages", help="chat messages as a JSON list, or @FILE holding one (as POST "
                                           "/v1/chat/completions' messages)")
    e.add_argument("--chunk", action="append", default=[], metavar="TEXT",
                   help="a reusable chunk placed before --prompt (repeatable, in order)")
    e.add_argument("--model", default="", help="model name (default: the router's)")
    e.add_argument("--session-id", default="", help="session id (the session policy keeps a session on one worker)")
    e.add_argument("--json", action="store_true", help="print the router's JSON answer as it is")
    e.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the router (default %(default)s)")
    e.set_defaults(func=run)


def request_body(args: argparse.Namespace) -> dict:
    """The completion or chat body of the arguments; ValueError when they are unusable."""
    body: dict = {"model": args.model} if args.model else {}
    if args.session_id:
        body["session_id"] = args.session_id
    if args.messages is not None:
        if args.chunk:
            raise ValueError("--chunk goes with --prompt (chat messages mark documents themselves)")
        text = args.messages
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        try:
            body["messages"] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--messages is not valid JSON: {e}") from None
        if not isinstance(body["messages"], list) or not body["messages"]:
            raise ValueError("--messages must be a non-empty JSON list of messages")
        return body
    body["prompt"] = args.prompt
    if args.chunk:
        body["kvweave"] = {"chunks": list(args.chunk)}
    return body


def fetch(url: str, body: dict, api_key: str | None, timeout: float) -> dict:
    """POST the body to the router's explain endpoint; RuntimeError with the router's message."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{url.rstrip('/')}/v1/route/explain", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise RuntimeError(f"the router answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"cannot reach the router at {url}: {getattr(e, 'reason', e)}") from None


def _tiers(tokens: dict[str, int]) -> str:
    return "/".join(str(tokens.get(s, 0)) for s in SOURCES)


def _cost(cost: float | None) -> str:
    return "-" if cost is None else f"{cost:.1f}"


def render(answer: dict) -> str:
    """The explanation as a table, the chosen worker marked with '*'."""
    chosen = answer["chosen"]
    lines = [f"prompt: {answer['num_prompt_tokens']} tokens, {answer['num_chunks']} reusable chunk(s)",
             f"chosen: {chosen['worker_id']} (policy {chosen['policy']}, reason {chosen['reason']}, "
             f"cost {_cost(chosen['cost'])})"]
    if "runner_up" in chosen:
        lines.append(f"runner-up: {chosen['runner_up']['worker_id']} (cost {_cost(chosen['runner_up']['cost'])})")
    header = ("", "worker", "prefix d/dram/ssd/peer", "chunks d/dram/ssd/peer", "running", "waiting",
              "queued", "kv_usage", "cost")
    rows = [header] + [("*" if c["worker_id"] == chosen["worker_id"] else "", c["worker_id"], _tiers(c["prefix_tokens"]),
                        _tiers(c["chunk_tokens"]), str(c["num_running"]), str(c["num_waiting"]),
                        str(c["num_queued_prefill_tokens"]), f"{c['kv_usage']:.2f}", _cost(c["cost"]))
                       for c in answer["candidates"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        body = request_body(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        answer = fetch(args.url, body, args.api_key or os.environ.get(API_KEY_ENV), args.timeout)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 0
