"""Targets of the load generator: a kvweave router over gRPC (the SDK), or any OpenAI-compatible HTTP
server (kvweave's router, vLLM, SGLang) over streaming HTTP.

Both measure a request the same way (`RequestRecord`): TTFT to the first streamed piece that carries
output, ITLs between later such pieces, end-to-end latency to the end of the stream, token counts and
cache reuse from the server's usage. Requests are never retried: a load generator that retried would
hide the failures it is there to count. A failure becomes an error kind on the record; nothing a
server does makes `send` raise (only cancellation propagates).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
import math
from dataclasses import dataclass, field

import aiohttp

from kvweave.client import AsyncClient
from kvweave.config_flags import bounded, flag
from kvweave.client_types import InvalidRequest, KVWeaveError, Overloaded, Timeout, Unavailable, Usage
from loadgen.records import RequestRecord
from loadgen.types import Turn

BACKENDS = ("grpc", "openai")
DEFAULT_URLS = {"grpc": "127.0.0.1:50051", "openai": "http://127.0.0.1:8000"}
CONNECT_TIMEOUT_S = 10.0
"""How long the check before the run waits for the server to list its models."""


class BackendError(Exception):
    """The target cannot be used (unreachable, refuses us, serves no such model); shown as is."""


class RequestFailed(Exception):
    """One request failed; `kind` is its error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass(frozen=True)
class TargetConfig:
    """The server under test (the `target` flags of `kvweave loadgen`)."""

    backend: str = field(default="grpc", metadata=flag(choices=BACKENDS))
    """grpc: a kvweave router through the SDK; openai: an OpenAI-compatible HTTP server (kvweave's
    router, vLLM, SGLang)"""
    url: str | None = field(default=None, metadata=flag(
        default_text=f"{DEFAULT_URLS['grpc']} for grpc, {DEFAULT_URLS['openai']} for openai"))
    """grpc: host:port; openai: base URL, with or without /v1"""
    model: str | None = field(default=None, metadata=flag(default_text="the first one the server lists"))
    """model to ask for"""
    api_key: str | None = field(default=None, metadata=flag(default_text=""))
    """sent as 'Authorization: Bearer KEY'"""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass(frozen=True)
class SendOptions:
    """How every request is sent (the `sampling` flags of `kvweave loadgen`)."""

    temperature: float = field(default=0.0, metadata=flag(parse=bounded(float, 0), default_text="0, greedy"))
    """sampling temperature of every request"""
    ignore_eos: bool = field(default=True, metadata=flag(action="optional", default_text="on"))
    """generate exactly the asked output lengths"""
    request_timeout: float = field(default=600.0, metadata=flag(parse=bounded(float, 0, strict=True),
                                                                metavar="S", default_text="600"))
    """a request taking longer fails as 'timeout' (seconds, end to end)"""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.request_timeout) and self.request_timeout > 0):
            raise ValueError(f"--request-timeout must be a finite number of seconds > 0, got {self.request_timeout}")


class _Pieces:
    """Timing of the streamed pieces of one request that carry output."""

    def __init__(self, record: RequestRecord) -> None:
        self.record, self.last, self.count = record, None, 0

    def add(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.record.ttft = now - self.record.start
        else:
            self.record.itls.append(now - self.last)
        self.last, self.count = now, self.count + 1


class Backend(ABC):
    """One target; `connect` once, then `send` concurrently from one event loop, then `close`."""

    name: str

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 options: SendOptions = SendOptions()) -> None:
        self.url, self.model, self.api_key, self.options = url, model, api_key, options

    async def connect(self) -> str:
        """Check that the target answers and settle the model (the first one it serves unless
        --model named one); returns the model. Raises BackendError."""
        models = await self._list_models()
        if not models:
            raise BackendError(f"{self.url} serves no model")
        if self.model is None:
            self.model = models[0]
        elif self.model not in models:
            raise BackendError(f"model {self.model!r} is not served at {self.url}; available: {', '.join(models)}")
        return self.model

    async def send(self, turn: Turn, history: Sequence[dict] = (), session_id: str = "") -> RequestRecord:
        """Send one turn (a chat turn after the session's `history`) and measure it."""
        record = RequestRecord(session_id=session_id, prompt_tokens=len(turn.token_ids or ()))
        record.start = time.perf_counter()
        try:
            async with asyncio.timeout(self.options.request_timeout):
                await self._stream(turn, history, session_id, record)
        except RequestFailed as e:
            record.fail(e.kind, e.message)
        except TimeoutError:
            record.fail("timeout", f"no complete reply within {self.options.request_timeout:g} s (--request-timeout)")
        except Exception as e:  # a client-side surprise must not end the run; it is counted and shown
            record.fail("client_error", f"{type(e).__name__}: {e}")
        record.latency = time.perf_counter() - record.start
        return record

    @abstractmethod
    async def _list_models(self) -> list[str]:
        ...

    @abstractmethod
    async def _stream(self, turn: Turn, history: Sequence[dict], session_id: str, record: RequestRecord) -> None:
        """Send the request and fill `record` in; raises RequestFailed."""

    @abstractmethod
    async def close(self) -> None:
        ...


# --------------------------------------------------------------------------------------- gRPC

_GRPC_KINDS: tuple[tuple[type[KVWeaveError], str], ...] = (
    (InvalidRequest, "invalid_request"), (Unavailable, "unavailable"), (Overloaded, "overloaded"),
    (Timeout, "timeout"))


def grpc_error_kind(err: KVWeaveError) -> str:
    """invalid_request, unavailable, overloaded, timeout, or grpc_<code> for other status codes."""
    for cls, kind in _GRPC_KINDS:
        if isinstance(err, cls):
            return kind
    return f"grpc_{err.code.name.lower()}"


def apply_usage(record: RequestRecord, usage: Usage) -> None:
    """Fill `record` in from the SDK's usage of a finished request."""
    record.prompt_tokens, record.output_tokens = usage.prompt_tokens, usage.completion_tokens
    record.cached_tokens, record.chunk_reused_tokens = usage.cached_tokens, usage.chunk_reused_tokens
    record.recomputed_tokens = usage.recomputed_tokens
    record.disaggregation, record.prefill_worker_id = usage.disaggregation, usage.prefill_worker_id


class GrpcBackend(Backend):
    """A kvweave router through `kvweave.AsyncClient`, with no retries. `url` is host:port. Chat
    messages go as they are (images as the SDK's image parts: their bytes travel in the request)."""

    name = "grpc"

    def __init__(self, url: str, **kwargs) -> None:
        if "://" in url:
            raise BackendError(f"--url for the grpc backend is host:port (e.g. {DEFAULT_URLS['grpc']}), got {url!r}")
        super().__init__(url, **kwargs)
        self.client = AsyncClient(url, timeout=self.options.request_timeout, max_retries=0, api_key=self.api_key)

    async def _list_models(self) -> list[str]:
        try:
            models = await asyncio.wait_for(self.client.list_models(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise BackendError(f"the kvweave router at {self.url} did not answer within "
                               f"{CONNECT_TIMEOUT_S:g} s") from None
        except KVWeaveError as e:
            raise BackendError(f"cannot reach the kvweave router at {self.url} over gRPC: {e}") from None
        return [m.id for m in models]

    async def _stream(self, turn: Turn, history: Sequence[dict], session_id: str, record: RequestRecord) -> None:
        if turn.messages is not None:
            prompt = {"messages": [*history, *turn.messages]}
        elif turn.segments is not None:
            prompt = {"segments": [{"text": text, "reusable": reusable} for text, reusable in turn.segments]}
        elif turn.token_ids is not None:
            prompt = {"token_ids": list(turn.token_ids)}
        else:
            prompt = {"prompt": turn.prompt}
        pieces, texts, tokens, usage = _Pieces(record), [], 0, None
        try:
            stream = self.client.generate(**prompt, max_tokens=turn.max_tokens, temperature=self.options.temperature,
                                          ignore_eos=self.options.ignore_eos, session_id=session_id or None,
                                          model=self.model)
            async for delta in stream:
                if delta.token_ids:
                    pieces.add()
                    tokens += len(delta.token_ids)
                texts.append(delta.text)
                record.worker_id = delta.worker_id or record.worker_id
                usage = delta.usage or usage
        except KVWeaveError as e:
            raise RequestFailed(grpc_error_kind(e), e.message) from None
        record.text = "".join(texts)
        record.output_tokens = tokens
        if usage:
            apply_usage(record, usage)

    async def close(self) -> None:
        await self.client.close()


# --------------------------------------------------------------------------------------- OpenAI HTTP

def openai_base_url(url: str) -> str:
    """The server's root from a base URL given with or without /v1 (and trailing slashes)."""
    if not url.startswith(("http://", "https://")):
        raise BackendError(f"--url for the openai backend is an http(s) URL (e.g. {DEFAULT_URLS['openai']}), "
                           f"got {url!r}")
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _error_message(status: int, body: str) -> str:
    """The server's error message from an OpenAI error body (else the start of the body)."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {status}: {message or body[:300] or 'no body'}"


def apply_usage_json(record: RequestRecord, usage: dict) -> None:
    """Fill `record` in from an OpenAI usage object (kvweave's figures in its `kvweave` block); what
    the server leaves out keeps the record's value (the token ids sent, the pieces streamed)."""
    record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
    record.output_tokens = usage.get("completion_tokens", record.output_tokens)
    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    kvweave = usage.get("kvweave") or {}
    record.chunk_reused_tokens = kvweave.get("chunk_reused_tokens") or 0
    record.recomputed_tokens = kvweave.get("recomputed_tokens") or 0
    record.worker_id = kvweave.get("worker_id") or record.worker_id
    record.disaggregation = kvweave.get("disaggregation") or ""
    record.prefill_worker_id = kvweave.get("prefill_worker_id") or ""


def openai_message(message: dict) -> dict:
    """A chat message as OpenAI's API takes it: the SDK's image parts ({"type": "image", "data": bytes})
    become `image_url` parts holding a base64 data URL; a message without them is returned as is."""
    content = message.get("content")
    if not isinstance(content, list) or not any(part.get("type") == "image" for part in content):
        return message
    return message | {"content": [_image_url_part(part["data"]) if part.get("type") == "image" else part
                                  for part in content]}


def _image_url_part(data: bytes) -> dict:
    from PIL import Image

    mime = Image.open(io.BytesIO(data)).get_format_mimetype()  # reads the header only
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


class OpenAIBackend(Backend):
    """An OpenAI-compatible server over streaming HTTP (`stream_options.include_usage`).

    Chat turns go to /v1/chat/completions (images as `image_url` data URLs); token ids, text and
    segments to /v1/completions (segments as kvweave's `"kvweave": {"chunks": [...]}` extension, the
    only kvweave-specific field sent, and only for turns that carry segments). `ignore_eos` is sent as vLLM and kvweave accept it.
    """

    name = "openai"

    def __init__(self, url: str, *, extra_body: dict | None = None, **kwargs) -> None:
        """`extra_body`: fields added to every request body (as the OpenAI SDK's `extra_body`), for a
        server that needs its own (e.g. llama.cpp's `logit_bias` where it lacks `ignore_eos`)."""
        super().__init__(openai_base_url(url), **kwargs)
        self.extra_body = dict(extra_body or {})
        self._session: aiohttp.ClientSession | None = None  # made in the running loop

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None),
                                                  connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def _list_models(self) -> list[str]:
        url = f"{self.url}/v1/models"
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise BackendError(f"GET {url} failed: {_error_message(resp.status, body)}")
                data = json.loads(body)["data"]
                return [m["id"] for m in data]
        except (aiohttp.ClientError, TimeoutError) as e:
            raise BackendError(f"cannot reach the OpenAI-compatible server at {self.url}: "
                               f"{e or type(e).__name__}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"GET {url} did not return an OpenAI model list: {e}") from None

    def _request(self, turn: Turn, history: Sequence[dict]) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": turn.max_tokens, "temperature": self.options.temperature,
                "ignore_eos": self.options.ignore_eos, "stream": True, "stream_options": {"include_usage": True},
                **self.extra_body}
        if turn.messages is not None:
            return "/v1/chat/completions", body | {"messages": [openai_message(m) for m in (*history, *turn.messages)]}
        if turn.segments is not None:
            chunks = [{"text": text, "reusable": reusable} for text, reusable in turn.segments]
            return "/v1/completions", body | {"prompt": "", "kvweave": {"chunks": chunks}}
        prompt = list(turn.token_ids) if turn.token_ids is not None else turn.prompt
        return "/v1/completions", body | {"prompt": prompt}

    async def _stream(self, turn: Turn, history: Sequence[dict], session_id: str, record: RequestRecord) -> None:
        path, body = self._request(turn, history)
        pieces, texts, usage, done = _Pieces(record), [], None, False
        try:
            async with self.session.post(self.url + path, json=body) as resp:
                if resp.status != 200:
                    raise RequestFailed(f"http_{resp.status}", _error_message(resp.status, await resp.text()))
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        error = event["error"]
                        code = error.get("code") if isinstance(error, dict) else None
                        message = error.get("message") if isinstance(error, dict) else str(error)
                        raise RequestFailed(f"http_{code}" if isinstance(code, int) else "stream_error",
                                            f"error event mid-stream: {message}")
                    for choice in event.get("choices") or ():
                        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                        if text or (choice.get("finish_reason") and pieces.count == 0):
                            pieces.add()
                            texts.append(text or "")
                    usage = event.get("usage") or usage
        except aiohttp.ClientConnectorError as e:
            raise RequestFailed("connection", str(e)) from None
        except (aiohttp.ClientError, ValueError) as e:  # a dropped connection, a malformed event
            kind = "stream_broken" if pieces.count else "connection"
            raise RequestFailed(kind, f"{type(e).__name__}: {e}") from None
        if not done:
            raise RequestFailed("stream_broken", "the event stream ended without data: [DONE]")
        record.text = "".join(texts)
        record.output_tokens = pieces.count
        if usage:
            apply_usage_json(record, usage)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_backend(name: str, url: str | None = None, **kwargs) -> Backend:
    """The backend `name` ("grpc" or "openai") for `url` (default: the backend's usual address)."""
    cls = {"grpc": GrpcBackend, "openai": OpenAIBackend}[name]
    return cls(url or DEFAULT_URLS[name], **kwargs)


def backend_for(target: TargetConfig, options: SendOptions) -> Backend:
    """The backend of `target`, sending with `options`; BackendError for an unusable URL."""
    return make_backend(target.backend, target.url, model=target.model, api_key=target.api_key, options=options)
