"""A synthetic agent/RAG trace in the Mooncake format, generated deterministically from a seed.

The shared data holds one trace with block hashes (Mooncake `conversation`); the Azure trace has
lengths only. This second trace stands for agent sessions whose turns carry tool outputs and
retrieved passages. Name it `synthetic:agent` (seed 0) or `synthetic:agent:SEED` wherever a trace
path is taken (`kvweave bench router --trace`).

Generator (random.Random(seed), all lengths in 512-token blocks, `AgentTraceConfig` holds the numbers):
- `num_agents` agent types, each with a fixed system prompt + tool definitions of 2-12 blocks;
  a session picks its agent by Zipf popularity (exponent `agent_zipf`).
- Sessions start as a Poisson process (`session_rate` per second). A session has a geometric number
  of turns (mean `mean_turns`, at most `max_turns`); turns are `mean_pause_s` apart on average
  (exponential: tool calls and retrieval).
- Turn k's prompt = the agent's prefix + the session's history + 1-8 new full blocks (tool output or
  retrieved passages, fresh ids) + one partial block (the new message, 1-512 tokens, fresh id). The
  new full blocks join the history (the partial one does not: next turn it is a different block).
  A session ends early once its prompt passes `max_blocks`.
- Output: 20-400 tokens, uniform. Timestamps in ms, requests sorted by arrival.
Ids are prefix-unique, as in the Mooncake release: equal leading ids are equal prefixes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from loadgen.traces import MOONCAKE_BLOCK_TOKENS, MooncakeRecord

PREFIX = "synthetic:"
KINDS = ("agent",)


@dataclass(frozen=True)
class AgentTraceConfig:
    num_agents: int = 12
    agent_zipf: float = 1.1
    session_rate: float = 0.55
    """Sessions started per second."""
    mean_turns: float = 6.0
    max_turns: int = 30
    mean_pause_s: float = 90.0
    max_blocks: int = 128


def is_synthetic(trace: str | Path) -> bool:
    return str(trace).startswith(PREFIX)


def parse_name(name: str) -> tuple[str, int]:
    """(kind, seed) of `synthetic:KIND[:SEED]`; ValueError naming the valid kinds."""
    parts = name.removeprefix(PREFIX).split(":")
    if parts[0] not in KINDS or len(parts) > 2:
        raise ValueError(f"unknown synthetic trace {name!r}; valid: {', '.join(PREFIX + k for k in KINDS)}[:SEED]")
    try:
        return parts[0], int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ValueError(f"the seed of {name!r} must be an integer") from None


def synthetic_trace(name: str, num_requests: int) -> list[MooncakeRecord]:
    """The first `num_requests` requests (by arrival) of the synthetic trace `name`."""
    _, seed = parse_name(name)
    return list(_generate(seed, num_requests, AgentTraceConfig()))


@lru_cache(maxsize=4)
def _generate(seed: int, num_requests: int, cfg: AgentTraceConfig) -> tuple[MooncakeRecord, ...]:
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    prefixes = [fresh(rng.randint(2, 12)) for _ in range(cfg.num_agents)]
    weights = [1.0 / (k + 1) ** cfg.agent_zipf for k in range(cfg.num_agents)]
    turns: list[tuple[float, int, int, tuple[int, ...]]] = []  # (time s, input tokens, output tokens, ids)
    start = 0.0
    # A cut after the num_requests-th arrival is exact once a session starts after it.
    while len(turns) < num_requests or start <= sorted(t[0] for t in turns)[num_requests - 1]:
        start += rng.expovariate(cfg.session_rate)
        history = list(prefixes[rng.choices(range(cfg.num_agents), weights)[0]])
        t = start
        for _ in range(min(cfg.max_turns, 1 + int(rng.expovariate(1.0 / (cfg.mean_turns - 1))))):
            history += fresh(rng.randint(1, 8))
            tail = rng.randint(1, MOONCAKE_BLOCK_TOKENS)
            ids = tuple(history + fresh(1))
            turns.append((t, MOONCAKE_BLOCK_TOKENS * (len(ids) - 1) + tail, rng.randint(20, 400), ids))
            if len(ids) >= cfg.max_blocks:
                break
            t += rng.expovariate(1.0 / cfg.mean_pause_s)
    turns.sort(key=lambda x: x[0])
    return tuple(MooncakeRecord(i + 1, round(t * 1000.0) / 1000.0, n_in, n_out, ids)
                 for i, (t, n_in, n_out, ids) in enumerate(turns[:num_requests]))
