"""Turns new tokens into streamed text (incremental detokenization, stop strings) and decides when a
request ends (`check_stop`: the one place that does)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.kv_handoff import Handoff
from worker.request import Request, RequestStatus
from kvweave.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class RequestOutput:
    """What a caller sees of a request after a step: the new delta and the totals so far."""

    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    error: str | None = None
    """Set with finish reason "error": this request failed inside a step (the others went on)."""
    num_chunk_reused_tokens: int = 0
    """Prompt tokens served from chunk-caches; `num_recomputed_tokens` of them were recomputed."""
    num_recomputed_tokens: int = 0
    image_sources: dict[str, int] | None = None
    """Images of the prompt by where their embeddings came from (`Request.image_sources`)."""
    handoff: Handoff | None = None
    """A prefill-only request handed off to a decode worker (finish reason "handoff"): the handle."""
    prompt_logits: torch.Tensor | None = None
    """Float32 logits [n, vocab] of the prompt's last n positions, on the final output, when the
    request asked for them (`LLMEngine.make_request(prompt_logits=n)`)."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def check_stop(req: Request, eos_token_ids: frozenset[int], max_model_len: int, stop_string: str | None = None
               ) -> RequestStatus | None:
    """Whether the request's newest token ends it: EOS or a stop token id (once `min_tokens` are
    out; the token id becomes the stop reason), a stop string (matched by the output processor; the
    reason), else the length limits. Sets `req.stop_reason`."""
    p, tok = req.params, req.output_token_ids[-1]
    if req.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and tok in eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if tok in p.stop_token_ids:
            req.stop_reason = tok
            return RequestStatus.FINISHED_STOPPED
    if stop_string is not None:
        req.stop_reason = stop_string
        return RequestStatus.FINISHED_STOPPED
    if req.num_output_tokens >= p.max_tokens or req.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


class _RequestText:
    __slots__ = ("detok", "text", "num_emitted", "stop", "hold")

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text = ""
        self.num_emitted = 0
        self.stop = stop
        # While streaming, hold back text that could still become the start of a stop string.
        self.hold = max((len(s) for s in stop), default=1) - 1


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestText] = {}
        self.outputs: dict[str, RequestOutput] = {}
        self.prompt_logits: dict[str, dict[int, torch.Tensor]] = {}

    def add_request(self, req: Request) -> None:
        self.states[req.req_id] = _RequestText(self.tokenizer, req.params.stop)
        lp = [] if req.params.logprobs is not None else None
        self.outputs[req.req_id] = RequestOutput(req.req_id, req.prompt_token_ids, logprobs=lp)

    def add_prompt_logits(self, req_id: str, positions: list[int], logits: torch.Tensor) -> None:
        """Keep prompt logits computed this step (a recomputed position replaces the earlier row)."""
        if req_id in self.states:
            rows = self.prompt_logits.setdefault(req_id, {})
            rows.update(zip(positions, logits))

    def process_token(self, req: Request, logprob=None) -> str | None:
        """Detokenize the request's newest token; returns a matched stop string, if any."""
        st, out = self.states[req.req_id], self.outputs[req.req_id]
        tok = req.output_token_ids[-1]
        out.token_ids.append(tok)
        out.new_token_ids.append(tok)
        if logprob is not None and out.logprobs is not None:
            out.logprobs.append(logprob)
        before = len(st.text)
        st.text += st.detok.add(tok)
        for s in st.stop:
            i = st.text.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                st.text = st.text[:i]
                return s
        return None

    def take_output(self, req: Request) -> RequestOutput:
        """The request's output with the delta since the last take."""
        st, out = self.states[req.req_id], self.outputs[req.req_id]
        finished = req.status.finished
        if finished and not isinstance(req.stop_reason, str):
            st.text += st.detok.flush()  # a stop string already cut the text
        end = len(st.text) if finished else max(st.num_emitted, len(st.text) - st.hold)
        delta = RequestOutput(
            req.req_id, req.prompt_token_ids, list(out.token_ids), st.text[:end],
            out.new_token_ids, st.text[st.num_emitted:end], finished, req.status.finish_reason,
            req.stop_reason, max(req.num_cached_tokens, 0),
            list(out.logprobs) if out.logprobs is not None else None,
            num_chunk_reused_tokens=req.chunks.num_reused_tokens,
            num_recomputed_tokens=req.chunks.num_recomputed_tokens, image_sources=req.image_sources,
            handoff=req.handoff if req.status == RequestStatus.FINISHED_HANDOFF else None, error=req.error)
        st.num_emitted = end
        out.new_token_ids = []
        if finished:
            self.states.pop(req.req_id)
            self.outputs.pop(req.req_id)
            rows = self.prompt_logits.pop(req.req_id, None)
            if rows:
                delta.prompt_logits = torch.stack([rows[p] for p in sorted(rows)])
        return delta
