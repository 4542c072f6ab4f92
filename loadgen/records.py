"""What the load generator measures of one request: a `RequestRecord`, filled in by a backend."""
from __future__ import annotations

from dataclasses import dataclass, field

CANCELLED = "cancelled"
"""Error kind of requests cut short by Ctrl-C / SIGTERM."""


@dataclass(slots=True)
class RequestRecord:
    """One request's timings (seconds, `time.perf_counter` clock) and token counts.

    A request succeeded when `error` is None. `ttft` is measured to the first streamed piece that
    carries output tokens, `itls` are the gaps between later pieces that carry tokens, `latency` is
    end to end (send to the end of the stream).
    """

    start: float = 0.0
    """perf_counter when the request was sent."""
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    """Server-reported usage.prompt_tokens (or the token ids sent, when the server reports none)."""
    output_tokens: int = 0
    """Server-reported usage.completion_tokens (or the pieces streamed, when the server reports none)."""
    cached_tokens: int = 0
    """Prompt tokens the server served from its prefix cache."""
    chunk_reused_tokens: int = 0
    """Prompt tokens the server served from chunk-caches."""
    recomputed_tokens: int = 0
    """Of the chunk-reused tokens, those the server recomputed."""
    worker_id: str | None = None
    """The worker that served the request (with prefill/decode disaggregation: the one that decoded)."""
    disaggregation: str = ""
    """The router's prefill/decode decision from the usage: "remote" (prefilled on another worker), or
    why the request stayed on one worker ("short", "no_prefill_worker", ...); empty when the server
    reports none (no prefill workers, or not a kvweave router)."""
    prefill_worker_id: str = ""
    """The worker that prefilled the prompt, when "remote"."""
    tags: dict = field(default_factory=dict)
    """The session's tags (`Session.tags`, set by the runner), e.g. the mixed workload's `class`."""
    text: str = ""
    """The reply (kept for the chat history of the next turn)."""
    error: str | None = None
    """Error kind: invalid_request, unavailable, overloaded, timeout, http_NNN, connection,
    stream_broken, cancelled, ... (None: success)."""
    message: str = ""
    """The error's explanation (the server's message where it sent one)."""
    session_id: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, kind: str, message: str) -> "RequestRecord":
        """Mark the request failed (its timings so far are kept) and return it."""
        self.error, self.message = kind, message
        return self
