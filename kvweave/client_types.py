"""The SDK's plain data: results, errors, and the one conversion to and from the protobuf messages.

Protobuf stays in this module and `kvweave.client`; users see the dataclasses below.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvweave.errors import InvalidRequestError
from kvweave.images import HARD_LIMITS, decode_data_url
from kvweave.limits import check_id, check_role
from kvweave.sampling_params import MAX_UINT32, SamplingParams
from kvweave.v1 import common_pb2, inference_pb2

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_ABORT: "abort"}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

class KVWeaveError(Exception):
    """An RPC failed; `code` is the gRPC status code and `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidRequest(KVWeaveError):
    """The request was rejected as invalid (INVALID_ARGUMENT)."""


class Unavailable(KVWeaveError):
    """No server or worker could take the request (UNAVAILABLE), after the retries."""


class Overloaded(KVWeaveError):
    """The cluster's admission queue is full, or the API key's rate limit is reached
    (RESOURCE_EXHAUSTED); try again later: after `retry_after` seconds when the server said."""

    retry_after: float | None = None


class Unauthenticated(KVWeaveError):
    """The router requires an API key and none, or an unknown one, was sent (UNAUTHENTICATED)."""


class PermissionDenied(KVWeaveError):
    """The API key does not allow the request, e.g. another tenant (PERMISSION_DENIED)."""


class Timeout(KVWeaveError):
    """The request's deadline passed (DEADLINE_EXCEEDED)."""


ERROR_TYPES: dict[grpc.StatusCode, type[KVWeaveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def error_from_rpc(err: grpc.RpcError) -> KVWeaveError:
    """The typed exception for a failed call (a plain KVWeaveError for unmapped codes)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(err)
    error = ERROR_TYPES.get(code, KVWeaveError)(code, message)
    if isinstance(error, Overloaded):
        error.retry_after = _retry_after(err)
    return error


def _retry_after(err: grpc.RpcError) -> float | None:
    """The `retry-after` trailing metadata (seconds) of a rate-limited call, if any."""
    try:
        trailing = err.trailing_metadata() or ()
        return next((float(v) for k, v in trailing if k == "retry-after"), None)
    except (AttributeError, TypeError, ValueError):
        return None


def invalid(message: str) -> InvalidRequest:
    return InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, message)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass(slots=True)
class RouteInfo:
    """What the router predicted for the worker it chose; the worker's delivery is the usage's
    `cached_tokens` and `chunk_reused_tokens`."""
    worker_id: str = ""
    policy: str = ""
    reason: str = ""
    prefix_tokens: dict[str, int] = field(default_factory=dict)
    """Leading prompt tokens by source (device, dram, ssd, peer), sources with none left out."""
    chunk_tokens: dict[str, int] = field(default_factory=dict)
    """Reusable-chunk tokens beyond the prefix run, by the source of their cache."""
    cost: float | None = None
    runner_up_worker_id: str = ""
    runner_up_cost: float | None = None
    divergence: str = ""
    """"under" (the worker reused less than predicted: a stale index), "over" (more: its KV events
    are missing) or "" (agreed, or not compared)."""


@dataclass(slots=True)
class Usage:
    """Token accounting of one request."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from prefix-cached blocks."""
    chunk_reused_tokens: int = 0
    """Prompt tokens served from chunk-caches."""
    recomputed_tokens: int = 0
    """Of the chunk-reused tokens, those recomputed."""
    disaggregation: str = ""
    """The router's prefill/decode decision: "remote" or why the request stayed on one worker
    (empty when the cluster has no prefill workers)."""
    prefill_worker_id: str = ""
    """The worker that prefilled the prompt, when "remote"."""
    images_cached: int = 0
    """Images of the prompt whose embeddings the (prefill) worker had cached, fetched from another
    worker (an encode worker), or encoded itself."""
    images_fetched: int = 0
    images_encoded: int = 0
    route: RouteInfo | None = None
    """The router's prediction (None from a router that sends none)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class GenerateDelta:
    """One streamed piece of a completion: the text and token ids new since the previous delta."""
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    """"stop", "length" or "abort" on the last delta, else None."""
    stop_reason: str | None
    """The stop string or stop token id that ended the request, if any."""
    usage: Usage | None
    """Set on the last delta."""
    worker_id: str
    request_id: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class Completion:
    """A whole completion, as `complete` and `chat` return it."""
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    worker_id: str
    request_id: str = ""
    stop_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class RouteCandidate:
    """One eligible worker as the router's policy saw it (`RouteExplanation.candidates`)."""
    route: RouteInfo
    """Its predicted tokens by source and its cost."""
    num_running: int
    num_waiting: int
    num_queued_prefill_tokens: int
    kv_usage: float


@dataclass(slots=True)
class RouteExplanation:
    """Where the router would place a request now, and why (`Client.explain`)."""
    num_prompt_tokens: int
    num_chunks: int
    chosen: RouteInfo
    """The worker it would choose, with the runner-up."""
    candidates: list[RouteCandidate]


@dataclass(slots=True)
class ModelInfo:
    id: str
    max_model_len: int
    num_workers: int


@dataclass(slots=True)
class Segment:
    """One piece of a segmented prompt; `reusable` marks a chunk whose KV may be reused anywhere."""
    text: str
    reusable: bool = False


class CompletionBuilder:
    """Accumulates deltas into a `Completion`."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self.completion = Completion(text="", token_ids=[], finish_reason=None, usage=None, worker_id="")

    def add(self, delta: GenerateDelta) -> None:
        c = self.completion
        self._texts.append(delta.text)
        c.token_ids.extend(delta.token_ids)
        c.logprobs.extend(delta.logprobs)
        c.worker_id = delta.worker_id or c.worker_id
        c.request_id = delta.request_id or c.request_id
        if delta.finished:
            c.finish_reason, c.stop_reason, c.usage = delta.finish_reason, delta.stop_reason, delta.usage

    def build(self) -> Completion:
        self.completion.text = "".join(self._texts)
        return self.completion


# ---------------------------------------------------------------------------------------------
# Protobuf conversion
# ---------------------------------------------------------------------------------------------

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "logprobs", "min_tokens")


def sampling_to_proto(params: Mapping[str, Any]) -> common_pb2.SamplingParams:
    """Unset (None) parameters stay unset, so the server's defaults apply."""
    msg = common_pb2.SamplingParams()
    for name, value in params.items():
        if value is None:
            continue
        if name == "stop":
            msg.stop.extend([value] if isinstance(value, str) else list(value))
        elif name == "stop_token_ids":
            msg.stop_token_ids.extend(int(t) for t in value)
        else:
            setattr(msg, name, value)
    return msg


def _messages_to_proto(messages: Iterable[Mapping[str, Any] | Any]) -> common_pb2.ChatMessages:
    """A message marked `{"kvweave": {"document": True}}` is a document (a reusable chunk)."""
    out = common_pb2.ChatMessages()
    for i, m in enumerate(messages):
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else (m.role, m.content)
        try:
            check_role(role, i)
        except InvalidRequestError as e:
            raise invalid(str(e)) from None
        options = (m.get("kvweave") if isinstance(m, Mapping) else None) or {}
        document = options.get("document", False) if isinstance(options, Mapping) else options
        if not isinstance(document, bool):
            raise invalid(f"messages[{i}]['kvweave'] must be {{'document': bool}}, got {options!r}")
        if isinstance(content, list) and not document:
            out.messages.add(role=role, parts=[_part_to_proto(p, i, j) for j, p in enumerate(content)])
            continue
        if not isinstance(content, str):
            raise invalid(f"messages[{i}]: content must be a string or a list of text and image parts over gRPC "
                          f"(got {type(content).__name__}); mark a whole message as a document with "
                          "{'kvweave': {'document': True}}")
        out.messages.add(role=role, content=content, document=document)
    return out


def _part_to_proto(part: Any, i: int, j: int) -> common_pb2.ContentPart:
    """{"type": "text", "text": str}, {"type": "image", "data": bytes} or OpenAI's {"type": "image_url",
    "image_url": {"url": "data:image/png;base64,..."}} (decoded here: the bytes go over gRPC)."""
    where = f"messages[{i}].content[{j}]"
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return common_pb2.ContentPart(text=part["text"])
    if kind == "image" and isinstance(part.get("data"), bytes):
        return common_pb2.ContentPart(image=part["data"])
    if kind == "image_url":
        url = part.get("image_url")
        try:
            data = decode_data_url(url.get("url") if isinstance(url, Mapping) else url, where, HARD_LIMITS)
        except InvalidRequestError as e:
            raise invalid(str(e)) from None
        return common_pb2.ContentPart(image=data)
    raise invalid(f"{where}: a content part must be {{'type': 'text', 'text': str}}, {{'type': 'image', 'data': "
                  "bytes}} or {'type': 'image_url', 'image_url': {'url': data URL}}")


def _segments_to_proto(segments: Iterable[Segment | Mapping[str, Any] | str]) -> common_pb2.Segments:
    """Checked here so that mistakes fail at once with a message naming the segment."""
    if isinstance(segments, (str, bytes, Mapping, Segment)):
        raise invalid("segments must be a list of Segment, {'text', 'reusable'} dicts or strings")
    out = common_pb2.Segments()
    for i, s in enumerate(segments):
        if isinstance(s, str):
            text, reusable = s, False
        elif isinstance(s, Segment):
            text, reusable = s.text, s.reusable
        elif isinstance(s, Mapping):
            unknown = sorted(set(s) - {"text", "reusable"})
            if unknown:
                raise invalid(f"segment {i}: unknown key(s) {', '.join(map(str, unknown))} (expected text, reusable)")
            text, reusable = s.get("text"), s.get("reusable", False)
        else:
            raise invalid(f"segment {i} must be a Segment, a {{'text', 'reusable'}} dict or a string, "
                          f"got {type(s).__name__}")
        if not isinstance(text, str):
            raise invalid(f"segment {i}: text must be a string, got {type(text).__name__}")
        if not text:
            raise invalid(f"segment {i} has an empty text")
        if not isinstance(reusable, bool):
            raise invalid(f"segment {i}: reusable must be a boolean, got {type(reusable).__name__}")
        out.segments.add(text=text, reusable=reusable)
    if not out.segments:
        raise invalid("segments must not be empty")
    return out


def build_request(*, prompt: str | None, messages: Sequence | None, token_ids: Sequence[int] | None,
                  segments: Sequence | None, sampling: Mapping[str, Any], session_id: str | None,
                  tenant: str | None, request_id: str | None, model: str | None) -> inference_pb2.GenerateRequest:
    """A GenerateRequest from exactly one prompt form; raises InvalidRequest otherwise."""
    given = [name for name, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids),
                                  ("segments", segments)) if v is not None]
    if len(given) != 1:
        raise invalid(f"give exactly one of prompt, messages, token_ids, segments (got {given or 'none'})")
    check_sampling(sampling)
    try:
        for name, value in (("session_id", session_id), ("tenant", tenant), ("request_id", request_id),
                            ("model", model)):
            check_id(name, value or "")
    except InvalidRequestError as e:
        raise invalid(str(e)) from None
    try:
        req = inference_pb2.GenerateRequest(request_id=request_id or "", model=model or "",
                                            session_id=session_id or "", tenant=tenant or "",
                                            sampling=sampling_to_proto(sampling))
        if prompt is not None:
            req.text = prompt
        elif messages is not None:
            req.chat.CopyFrom(_messages_to_proto(messages))
        elif token_ids is not None:
            req.token_ids.ids.extend(int(t) for t in token_ids)
        else:
            req.segments.CopyFrom(_segments_to_proto(segments))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise invalid(f"malformed request: {e}") from e
    return req


def check_sampling(sampling: Mapping[str, Any]) -> None:
    """InvalidRequest naming the first sampling parameter the server would refuse (the same checks:
    kvweave.sampling_params), so a bad value fails before it is sent."""
    given = {name: value for name, value in sampling.items() if value is not None}
    if given.get("stop") is not None and isinstance(given["stop"], (list, tuple)):
        given["stop"] = list(given["stop"])
    if isinstance(given.get("stop_token_ids"), tuple):
        given["stop_token_ids"] = list(given["stop_token_ids"])
    given.setdefault("max_tokens", MAX_UINT32)  # unset: the server picks it (a chat runs to the context)
    try:
        SamplingParams(**given)
    except InvalidRequestError as e:
        raise invalid(str(e)) from None
    except TypeError as e:
        raise invalid(f"malformed sampling parameters: {e}") from None


def _usage_from_proto(u: common_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                 cached_tokens=u.cached_tokens, chunk_reused_tokens=u.chunk_reused_tokens,
                 recomputed_tokens=u.recomputed_tokens, disaggregation=u.disaggregation,
                 prefill_worker_id=u.prefill_worker_id, images_cached=u.images_cached,
                 images_fetched=u.images_fetched, images_encoded=u.images_encoded, route=_route_from_proto(u.route) if u.HasField("route") else None)


def _tier_tokens(t: common_pb2.TierTokens) -> dict[str, int]:
    return {name: n for name in ("device", "dram", "ssd", "peer") if (n := getattr(t, name))}


def _route_from_proto(r: common_pb2.RoutePrediction) -> RouteInfo:
    return RouteInfo(r.worker_id, r.policy, r.reason, _tier_tokens(r.prefix_tokens), _tier_tokens(r.chunk_tokens),
                     r.cost if r.HasField("cost") else None, r.runner_up_worker_id,
                     r.runner_up_cost if r.HasField("runner_up_cost") else None, r.divergence)


def delta_from_proto(msg: inference_pb2.GenerateResponse) -> GenerateDelta:
    return GenerateDelta(
        text=msg.text, token_ids=list(msg.token_ids), finished=msg.finished,
        finish_reason=FINISH_REASONS.get(msg.finish_reason), stop_reason=msg.stop_reason or None,
        usage=_usage_from_proto(msg.usage) if msg.HasField("usage") else None,
        worker_id=msg.worker_id, request_id=msg.request_id,
        logprobs=[TokenLogprob(lp.token_id, lp.logprob, dict(lp.top_logprobs)) for lp in msg.logprobs])


def models_from_proto(msg: inference_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.id, m.max_model_len, m.num_workers) for m in msg.models]


def explanation_from_proto(msg: inference_pb2.ExplainResponse) -> RouteExplanation:
    return RouteExplanation(msg.num_prompt_tokens, msg.num_chunks, _route_from_proto(msg.chosen), [
        RouteCandidate(_route_from_proto(c.prediction), c.num_running, c.num_waiting, c.num_queued_prefill_tokens,
                       c.kv_usage) for c in msg.candidates])
