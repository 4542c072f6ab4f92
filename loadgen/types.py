"""What a workload hands the load generator: sessions of turns.

A `Session` is a sequence of requests (`Turn`s) sent one after the other: single-request workloads
(rag, prefix-repetition, mooncake, azure, random, mixed, multimodal) make one-turn sessions; chat
workloads (multi-turn, agent) make sessions whose history grows: the runner sends the session's
history plus the turn's new `messages`, then appends the assistant's reply to the history before the
next turn.
A session starts at its `arrival_s` (trace timestamps, already scaled) or, when that is None, when
the arrival process says; a turn after the first waits `pause_s` after the previous reply ended
(an agent's tool call, a user's think time).

Exactly one prompt form is set per turn:
- `token_ids`: sent as token ids (exact lengths; /v1/completions with a list `prompt` over HTTP);
- `prompt`: plain text completion;
- `segments`: (text, reusable) pieces; reusable ones are chunks whose KV the server may reuse
  anywhere (gRPC `segments`, HTTP `kvweave.chunks`);
- `messages`: chat messages (this turn's new ones; a session's history is prepended); a content may
  be a list of the SDK's parts, {"type": "text", "text": str} and {"type": "image", "data": bytes}
  (the openai backend sends images as `image_url` data URLs).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


class WorkloadError(ValueError):
    """A workload cannot be built: a missing or malformed dataset or trace, or bad options. The message
    says what and where (file, line), and is shown to the user as is."""


@dataclass(frozen=True, slots=True)
class Turn:
    max_tokens: int
    """Output tokens asked for (sent with ignore_eos unless the run says otherwise)."""
    token_ids: tuple[int, ...] | None = None
    prompt: str | None = None
    segments: tuple[tuple[str, bool], ...] | None = None
    messages: tuple[dict, ...] | None = None
    pause_s: float = 0.0
    """Wait after the previous turn's reply ended, before sending this one (first turn: ignored)."""


@dataclass(slots=True)
class Session:
    session_id: str
    turns: list[Turn]
    arrival_s: float | None = None
    """Start time from the beginning of the run (trace replay); None: from the arrival process."""
    tags: dict = field(default_factory=dict)
    """Workload facts kept with each result (e.g. the question's index, the trace line)."""


class Workload(Protocol):
    name: str

    def sessions(self) -> Iterator[Session]:
        """Sessions in arrival order, deterministic for a seed; may be endless (the run stops it)."""
        ...
