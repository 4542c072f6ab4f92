"""Sampling parameters: what a request asks of the sampler, validated where the request enters.

Every process builds and checks them (the router before it places a request, the worker when a
request arrives, the engine for offline use), so they live in the torch-free bottom layer; the
sampler itself (worker/sampling.py) is the only part that needs tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvweave.errors import InvalidRequestError

MAX_UINT32 = 2**32 - 1
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (as vLLM's): dividing logits by them overflows."""
MAX_LOGPROBS = 20
"""Most top alternatives a request may ask for per token (OpenAI's top_logprobs bound)."""
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
"""Bounds on a request's stop lists: every step checks them, for every token."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """Maximum number of tokens to generate."""
    temperature: float = 1.0
    """Sampling temperature; 0 (or below GREEDY_TEMPERATURE) means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the most likely tokens whose probabilities add up to top_p (1: all)."""
    top_k: int = -1
    """-1 (or 0) disables top-k."""
    seed: int | None = None
    """Makes random sampling reproducible for this request, whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; they are not included in the text."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives."""
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """InvalidRequestError naming the first field out of range. The bounds are those of the wire
        types (kvweave/v1 common.proto) and what one request may ask of every step it shares."""
        if not _is_int(self.max_tokens) or not 0 < self.max_tokens <= MAX_UINT32:
            raise InvalidRequestError(f"max_tokens must be an integer in [1, {MAX_UINT32}], got "
                                      f"{_show(self.max_tokens)}", "max_tokens")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 1e6:
            raise InvalidRequestError(f"temperature must be a finite number in [0, 1e6], got "
                                      f"{_show(self.temperature)}", "temperature")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {_show(self.top_p)}", "top_p")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_INT32:
            raise InvalidRequestError(f"top_k must be -1 (disabled) or an integer in [0, {MAX_INT32}], got "
                                      f"{_show(self.top_k)}", "top_k")
        if self.seed is not None and (not _is_int(self.seed) or not -MAX_INT64 - 1 <= self.seed <= MAX_INT64):
            raise InvalidRequestError(f"seed must be a 64-bit signed integer, got {_show(self.seed)}", "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed",
                                      "stop")
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidRequestError(f"stop must be a non-empty string or a list of non-empty strings of at most "
                                      f"{MAX_STOP_STRING_CHARS} characters", "stop")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most "
                                      f"{MAX_STOP_TOKEN_IDS} are allowed", "stop_token_ids")
        if not all(_is_int(t) and 0 <= t <= MAX_UINT32 for t in self.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be integers in [0, {MAX_UINT32}]", "stop_token_ids")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got "
                                      f"{_show(self.logprobs)}", "logprobs")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be an integer in [0, max_tokens], got "
                                      f"{_show(self.min_tokens)}", "min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _show(value) -> str:
    """A short rendering of a refused value (never a whole input echoed back)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a huge number"
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
