"""Turns new tokens into streamed text: incremental detokenization and stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field

from worker.request import Request
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
    num_chunk_reused_tokens: int = 0
    """Prompt tokens served from chunk-caches; `num_recomputed_tokens` of them were recomputed."""
    num_recomputed_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


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

    def add_request(self, req: Request) -> None:
        self.states[req.req_id] = _RequestText(self.tokenizer, req.params.stop)
        lp = [] if req.params.logprobs is not None else None
        self.outputs[req.req_id] = RequestOutput(req.req_id, req.prompt_token_ids, logprobs=lp)

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
            num_chunk_reused_tokens=req.num_chunk_reused_tokens, num_recomputed_tokens=req.num_recomputed_tokens)
        st.num_emitted = end
        out.new_token_ids = []
        if finished:
            self.states.pop(req.req_id)
            self.outputs.pop(req.req_id)
        return delta
