"""OpenAI wire format: request bodies -> `GenerateInput`, results -> response and chunk objects.

Pure functions, no I/O (the aiohttp side is controlplane/http_frontend.py). Field mapping:
max_tokens / max_completion_tokens, temperature, top_p, n (must be 1), stop (str or list), seed,
logprobs (completions: int; chat: bool + top_logprobs), stream, stream_options.include_usage;
`user` is checked (an identifier, kvweave/limits.py, as `session_id` is) and otherwise ignored; extensions: top_k, ignore_eos, min_tokens, stop_token_ids, session_id, and
reusable chunks (KV that may be reused wherever the text appears): `/v1/completions` takes
`"kvweave": {"chunks": [str | {"text": str, "reusable": bool}, ...]}` followed by the optional
string `prompt`; chat messages mark documents with `"kvweave": {"document": true}` or content parts
`{"type": "document", "text": ...}` (kvweave/segments.py). Usage adds `"kvweave": {"computed_tokens",
"prefix_reused_tokens", "chunk_reused_tokens", "recomputed_tokens", "worker_id"}`, and with prefill
workers in the cluster "disaggregation" (the router's decision) and "prefill_worker_id"; "migrations"
when the request moved to another worker mid-stream (docs/resilience.md); "images": {"cached",
"fetched", "encoded"} for a prompt with images (where its worker got their embeddings); "route": what the router
predicted for the worker it chose (prefix and chunk tokens by source, its cost and the runner-up's),
what the worker "delivered" (prefix-cached and chunk-reused tokens) and the "divergence" between them
("", "under" or "over": controlplane/explain.py).
Features we do not implement (penalties, logit_bias, tools, echo, best_of > 1, suffix) are
rejected with a 400 rather than silently ignored.

vLLM's /tokenize and /detokenize (`vllm bench serve` calls them): `parse_tokenize` takes
{"model", "prompt": str, "add_special_tokens" (default true)} or {"model", "messages",
"add_generation_prompt" (default true)}; `parse_detokenize` takes {"model", "tokens": [int]}.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.explain import prediction_json
from controlplane.router import GenerateInput, TokenLogprob, Usage
from kvweave.errors import InvalidRequestError
from kvweave.limits import check_id, check_role
from kvweave.sampling_params import MAX_LOGPROBS, MAX_UINT32, SamplingParams
from kvweave.segments import CHAT_EXTENSION, flatten_messages
from kvweave.vision_prompt import without_image_parts
from kvweave.tokenizer import Tokenizer

_UNSUPPORTED_IF_SET = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None,
                       "tool_choice": None, "functions": None, "echo": False, "suffix": None, "best_of": 1}


class OpenAIRequestError(InvalidRequestError):
    """A malformed or unsupported field; `param` names it (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class ResponseOptions:
    """How to shape the response of one request."""

    chat: bool
    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    """Top alternatives asked for (0: only the sampled token's logprob); None: no logprobs."""
    req_id: str = ""
    created: int = 0


def parse_completion(body: dict, default_model: str) -> tuple[GenerateInput, ResponseOptions]:
    segments = _chunk_segments(body)
    max_tokens = _opt(body, "max_tokens", int)
    params = _sampling(body, logprobs=_opt(body, "logprobs", int), max_tokens=16 if max_tokens is None else max_tokens)
    if segments is None:
        inp = GenerateInput(prompt=_completion_prompt(body.get("prompt")), params=params)
    else:
        inp = GenerateInput(segments=segments, params=params)
    return _finish(body, inp, ResponseOptions(chat=False, model="", logprobs=params.logprobs), default_model, "cmpl")


def parse_chat(body: dict, default_model: str) -> tuple[GenerateInput, ResponseOptions]:
    messages = _messages(body)
    max_tokens = _opt(body, "max_completion_tokens", int)
    max_tokens = _opt(body, "max_tokens", int) if max_tokens is None else max_tokens
    logprobs = None
    top_logprobs = _opt(body, "top_logprobs", int)
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_LOGPROBS:
        raise OpenAIRequestError(f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs")
    if _opt(body, "logprobs", bool):
        logprobs = top_logprobs or 0
    # Without max_tokens a chat generates up to the context length (the router sets it once the
    # prompt is known); a given 0 is refused like any other out-of-range value.
    params = _sampling(body, logprobs=logprobs, max_tokens=MAX_UINT32 if max_tokens is None else max_tokens)
    inp = GenerateInput(messages=messages, params=params, auto_max_tokens=max_tokens is None)
    return _finish(body, inp, ResponseOptions(chat=True, model="", logprobs=logprobs), default_model, "chatcmpl")


@dataclass(slots=True)
class TokenizeRequest:
    inp: GenerateInput
    """The prompt (a string) or the chat messages, and the model named (empty: the router's)."""
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


def parse_tokenize(body: dict) -> TokenizeRequest:
    """A /tokenize body: a text prompt, or chat messages rendered with the chat template (which
    places the special tokens itself, so add_special_tokens must not be true with messages)."""
    model = _opt(body, "model", str) or ""
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise OpenAIRequestError("give 'prompt' or 'messages', not both", "prompt")
        if _opt(body, "add_special_tokens", bool):
            raise OpenAIRequestError("'add_special_tokens' with 'messages' is not supported: the chat template "
                                     "places the special tokens", "add_special_tokens")
        for name in ("continue_final_message", "tools", "chat_template"):
            if body.get(name) not in (None, False, []):
                raise OpenAIRequestError(f"'{name}' is not supported by kvweave", name)
        add_generation_prompt = _opt(body, "add_generation_prompt", bool)
        return TokenizeRequest(GenerateInput(messages=_messages(body), model=model), add_special_tokens=False,
                               add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise OpenAIRequestError("'prompt' must be a string (or give 'messages')", "prompt")
    add_special_tokens = _opt(body, "add_special_tokens", bool)
    return TokenizeRequest(GenerateInput(prompt=prompt, model=model),
                           add_special_tokens=True if add_special_tokens is None else add_special_tokens)


def parse_detokenize(body: dict) -> tuple[str, list[int]]:
    """(model named or "", token ids) of a /detokenize body."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise OpenAIRequestError("'tokens' must be a list of integer token ids", "tokens")
    return _opt(body, "model", str) or "", tokens


def _finish(body: dict, inp: GenerateInput, opts: ResponseOptions, default_model: str,
            prefix: str) -> tuple[GenerateInput, ResponseOptions]:
    for name, neutral in _UNSUPPORTED_IF_SET.items():
        if body.get(name) not in (None, neutral) and body.get(name) != {} and body.get(name) != []:
            raise OpenAIRequestError(f"'{name}' is not supported by kvweave", name)
    if _opt(body, "n", int) not in (None, 1):
        raise OpenAIRequestError("only n=1 is supported", "n")
    inp.model = _opt(body, "model", str) or ""
    inp.session_id = _identifier(body, "session_id")
    _identifier(body, "user")
    check_id("model", inp.model)
    inp.req_id = f"{prefix}-{uuid.uuid4().hex}"
    opts.model = inp.model or default_model
    opts.stream = bool(_opt(body, "stream", bool))
    stream_options = _opt(body, "stream_options", dict) or {}
    opts.include_usage = bool(stream_options.get("include_usage")) if opts.stream else True
    opts.req_id, opts.created = inp.req_id, int(time.time())
    return inp, opts


def _opt(body: dict, name: str, kind: type):
    """body[name] if present and not null, checked to be of `kind` (ints accepted for floats)."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise OpenAIRequestError(f"'{name}' must be {_KIND_NAMES[kind]}, got {type(value).__name__}", name)
    return value


def _identifier(body: dict, name: str) -> str:
    """body[name], a bounded printable string ("" when absent), else a 400 naming `name`."""
    try:
        return check_id(name, _opt(body, name, str) or "")
    except InvalidRequestError as e:
        raise OpenAIRequestError(str(e), name) from None


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", dict: "an object",
               list: "a list"}


def _sampling(body: dict, logprobs: int | None, max_tokens: int) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise OpenAIRequestError("'stop' must be a string or a list of strings", "stop")
    fields = {"max_tokens": max_tokens, "stop": stop or [], "logprobs": logprobs}
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("seed", int),
                       ("ignore_eos", bool), ("min_tokens", int), ("stop_token_ids", list)):
        value = _opt(body, name, kind)
        if value is not None:
            fields[name] = float(value) if kind is float else value
    return SamplingParams(**fields)  # validates: InvalidRequestError names the field


def _completion_prompt(prompt) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    if prompt is None:
        raise OpenAIRequestError("'prompt' is required", "prompt")
    raise OpenAIRequestError("'prompt' must be a string or a list of token ids (batches of several prompts "
                             "are not supported)", "prompt")


def _chunk_segments(body: dict) -> list[tuple[str, bool]] | None:
    """The segments of `"kvweave": {"chunks": [...]}` followed by `prompt`, or None without chunks."""
    ext = _opt(body, CHAT_EXTENSION, dict)
    if ext is None:
        return None
    unknown = sorted(set(ext) - {"chunks"})
    if unknown:
        raise OpenAIRequestError(f"'kvweave': unknown field(s) {', '.join(unknown)} (supported: chunks)", "kvweave")
    chunks = ext.get("chunks")
    if chunks is None:
        return None
    if not isinstance(chunks, list) or not chunks:
        raise OpenAIRequestError("'kvweave.chunks' must be a non-empty list of strings or "
                                 "{'text': str, 'reusable': bool} objects", "kvweave.chunks")
    segments = []
    for i, chunk in enumerate(chunks):
        where = f"kvweave.chunks[{i}]"
        reusable = True
        if isinstance(chunk, dict):
            unknown = sorted(set(chunk) - {"text", "reusable"})
            if unknown:
                raise OpenAIRequestError(f"{where}: unknown field(s) {', '.join(unknown)}", "kvweave.chunks")
            reusable = chunk.get("reusable", True)
            if not isinstance(reusable, bool):
                raise OpenAIRequestError(f"{where}: 'reusable' must be a boolean, got {type(reusable).__name__}",
                                         "kvweave.chunks")
            chunk = chunk.get("text")
        if not isinstance(chunk, str):
            raise OpenAIRequestError(f"{where} must be a string or an object with a string 'text', got "
                                     f"{type(chunk).__name__}", "kvweave.chunks")
        if not chunk:
            raise OpenAIRequestError(f"{where} has an empty text", "kvweave.chunks")
        segments.append((chunk, reusable))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is not None and not isinstance(prompt, str):
        raise OpenAIRequestError("with 'kvweave.chunks', 'prompt' must be a string (the text after the chunks)",
                                 "prompt")
    if prompt:
        segments.append((prompt, False))
    return segments


def _messages(body: dict) -> list[dict]:
    """body["messages"] as the router takes them, their document marks checked (to name the param)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIRequestError("'messages' is required: a non-empty list of {'role', 'content'} objects", "messages")
    messages = [_message(m, i) for i, m in enumerate(messages)]
    try:
        flatten_messages(without_image_parts(messages))  # image parts are checked by the router (kvweave/images.py)
    except InvalidRequestError as e:
        raise OpenAIRequestError(str(e), "messages") from None
    return messages


def _message(message, i: int) -> dict:
    """A chat message as the router takes it: content a string or a list of "text" / "document" parts
    (checked by `flatten_messages`); an assistant's null content becomes ""."""
    if not isinstance(message, dict):
        raise OpenAIRequestError(f"messages[{i}] must be an object", f"messages[{i}]")
    check_role(message.get("role"), i)  # InvalidRequestError naming messages[i].role
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        content = ""
    if not isinstance(content, (str, list)):
        raise OpenAIRequestError(f"messages[{i}]['content'] must be a string or a list of text parts, got "
                                 f"{type(content).__name__}", f"messages[{i}].content")
    return {**message, "content": content}


# ------------------------------------------------------------------------------------ responses

def usage_json(usage: Usage | None, worker_id: str = "") -> dict | None:
    """OpenAI's usage object plus kvweave's block (token accounting and the worker that served)."""
    if usage is None:
        return None
    kvweave = {"computed_tokens": usage.computed_tokens, "prefix_reused_tokens": usage.cached_tokens,
               "chunk_reused_tokens": usage.chunk_reused_tokens, "recomputed_tokens": usage.recomputed_tokens}
    if worker_id:
        kvweave["worker_id"] = worker_id
    if usage.disaggregation:
        kvweave["disaggregation"] = usage.disaggregation
    if usage.prefill_worker_id:
        kvweave["prefill_worker_id"] = usage.prefill_worker_id
    if usage.num_migrations:
        kvweave["migrations"] = usage.num_migrations
    if usage.images_cached or usage.images_fetched or usage.images_encoded:
        kvweave["images"] = {"cached": usage.images_cached, "fetched": usage.images_fetched,
                             "encoded": usage.images_encoded}
    if usage.route is not None:
        kvweave["route"] = prediction_json(usage.route) | {
            "delivered": {"prefix_tokens": usage.cached_tokens, "chunk_tokens": usage.chunk_reused_tokens},
            "divergence": usage.route_divergence}
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}, "kvweave": kvweave}


def logprobs_json(opts: ResponseOptions, tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob],
                  text_offset: int = 0) -> dict | None:
    if opts.logprobs is None:
        return None
    tokens = [tokenizer.decode([lp.token_id], skip_special_tokens=False) for lp in logprobs]
    if opts.chat:
        return {"content": [
            {"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode()),
             "top_logprobs": [_top_entry(tokenizer, i, v) for i, v in lp.top_logprobs.items()]}
            for tok, lp in zip(tokens, logprobs)]}
    offsets, pos = [], text_offset
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{tokenizer.decode([i], skip_special_tokens=False): v for i, v in lp.top_logprobs.items()}
                             for lp in logprobs],
            "text_offset": offsets}


def _top_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    tok = tokenizer.decode([token_id], skip_special_tokens=False)
    return {"token": tok, "logprob": logprob, "bytes": list(tok.encode())}


def response_json(opts: ResponseOptions, text: str, finish_reason: str | None, usage: Usage | None,
                  logprobs: dict | None, worker_id: str = "") -> dict:
    """The non-streaming response object."""
    if opts.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": opts.req_id, "object": "chat.completion" if opts.chat else "text_completion",
            "created": opts.created, "model": opts.model, "choices": [choice],
            "usage": usage_json(usage, worker_id)}


def chunk_json(opts: ResponseOptions, text: str | None, finish_reason: str | None = None,
               logprobs: dict | None = None, usage: Usage | None = None, role: bool = False,
               worker_id: str = "") -> dict:
    """One streamed chunk; `text=None` with `usage` makes the final usage-only chunk (no choices)."""
    chunk = {"id": opts.req_id, "object": "chat.completion.chunk" if opts.chat else "text_completion",
             "created": opts.created, "model": opts.model, "choices": []}
    if text is not None:
        if opts.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            chunk["choices"].append({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
        else:
            chunk["choices"].append({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})
    if usage is not None or (opts.include_usage and text is None):
        chunk["usage"] = usage_json(usage, worker_id)
    return chunk


def error_json(message: str, err_type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
