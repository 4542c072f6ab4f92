"""The kvweave client SDK: `Client` (blocking) and `AsyncClient` (asyncio) for the router's gRPC API.

    with kvweave.Client("127.0.0.1:50051") as client:
        for delta in client.generate("The capital of France is", max_tokens=16):
            print(delta.text, end="", flush=True)
        print(client.chat([{"role": "user", "content": "Hi!"}], max_tokens=32).text)

Retries: a call that fails with UNAVAILABLE before its first delta is retried up to `max_retries`
times, sleeping `backoff * 2**attempt` seconds between attempts; once a delta has arrived, the error
surfaces. `timeout` is the whole call's deadline (retries included), sent to the server as the gRPC
deadline. Failures raise a `KVWeaveError` subclass (`InvalidRequest`, `Unavailable`, `Overloaded`,
`Unauthenticated`, `PermissionDenied`,
`Timeout`) carrying the gRPC status code and the server's message.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from kvweave.client_types import (CompletionBuilder, Completion, GenerateDelta, KVWeaveError, ModelInfo,
                                  RouteExplanation, Segment, Timeout, build_request, delta_from_proto, error_from_rpc,
                                  explanation_from_proto, models_from_proto)
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc

Metadata = Mapping[str, str] | Sequence[tuple[str, str]]
PromptSegments = Sequence[Segment | Mapping[str, Any] | str]


def _pem(value: bytes | str | None) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).read_bytes()


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); raises Timeout once it has passed."""
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise Timeout(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call could be retried")
        return left


class _ClientBase:
    """Options and request building shared by both clients."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None, max_retries: int = 3,
                 backoff: float = 0.2, tls: bool = False, root_certificates: bytes | str | None = None,
                 private_key: bytes | str | None = None, certificate_chain: bytes | str | None = None,
                 metadata: Metadata | None = None, api_key: str | None = None) -> None:
        """Connect to the router at `target` ("host:port").

        `timeout`: default deadline of each call in seconds (None: none). `max_retries`, `backoff`:
        retries of UNAVAILABLE before the first delta, sleeping backoff * 2**attempt seconds.
        `tls`: use TLS (implied by any certificate option); `root_certificates`, `private_key`,
        `certificate_chain`: PEM bytes, PEM text or file paths (the last two for mutual TLS).
        `metadata`: gRPC metadata sent with every call; `api_key`: sent as `authorization: Bearer KEY`.
        """
        if max_retries < 0 or backoff < 0:
            raise ValueError("max_retries and backoff must be >= 0")
        self.target, self.timeout, self.max_retries, self.backoff = target, timeout, max_retries, backoff
        self._tls = tls or any(v is not None for v in (root_certificates, private_key, certificate_chain))
        self._pems = (_pem(root_certificates), _pem(private_key), _pem(certificate_chain))
        items = list(metadata.items() if isinstance(metadata, Mapping) else metadata or [])
        if api_key:
            items.append(("authorization", f"Bearer {api_key}"))
        self._metadata = tuple(items) or None
        # Reconnect as fast as we retry, so that a retry really tries the server again.
        backoff_ms = max(int(backoff * 1000), 50)
        self._options = [("grpc.initial_reconnect_backoff_ms", backoff_ms),
                         ("grpc.min_reconnect_backoff_ms", backoff_ms),
                         ("grpc.max_reconnect_backoff_ms", max(backoff_ms * 8, 1000))]
        self._connect()

    def _connect(self) -> None:
        raise NotImplementedError

    def _credentials(self) -> grpc.ChannelCredentials:
        root, key, chain = self._pems
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def _retry_delay(self, err: grpc.RpcError, attempt: int, deadline: _Deadline) -> float | None:
        """Seconds to wait before retrying `err`, or None when it must surface."""
        if err.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return None
        delay = self.backoff * 2 ** attempt
        left = deadline.remaining()
        return delay if left is None else min(delay, left)

    @staticmethod
    def _request(prompt: str | None, messages: Sequence | None, token_ids: Sequence[int] | None,
                 segments: PromptSegments | None, session_id: str | None, tenant: str | None,
                 request_id: str | None, model: str | None, **sampling: Any) -> inference_pb2.GenerateRequest:
        return build_request(prompt=prompt, messages=messages, token_ids=token_ids, segments=segments,
                             sampling=sampling, session_id=session_id, tenant=tenant, request_id=request_id,
                             model=model)


GENERATE_DOC = """Stream a completion as `GenerateDelta`s; the last one has `finished`, `finish_reason` and `usage`.

Give exactly one prompt form: `prompt` (text), `messages` (chat, [{"role", "content"}]), `token_ids`,
or `segments` (`Segment`s, {"text", "reusable"} dicts or strings (not reusable); reusable segments are
chunks whose KV may be reused wherever they appear). A chat message marked
`{"kvweave": {"document": True}}` is such a chunk too. A message's content may be a list of parts
for a vision-language model: {"type": "text", "text": str}, {"type": "image", "data": bytes} (PNG, JPEG,
WebP) or OpenAI's {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}. The last delta's `usage` counts the prompt
tokens reused from the prefix cache (`cached_tokens`) and from chunk-caches (`chunk_reused_tokens`,
of which `recomputed_tokens` were recomputed), and `usage.route` (a `RouteInfo`) what the router
predicted for the worker it chose: tokens by tier, its cost and the runner-up's. Sampling parameters left as None take the server's
defaults. `session_id` keeps a session on one worker, `tenant` selects the cache namespace,
`request_id` names the request (for `abort`), `model` is optional when the cluster serves one model.
`timeout` overrides the client's deadline for this call.
"""


class Client(_ClientBase):
    """A blocking client of a kvweave router. Thread-safe; use one per process."""

    def _connect(self) -> None:
        target = self.target
        self._channel = (grpc.secure_channel(target, self._credentials(), options=self._options) if self._tls
                         else grpc.insecure_channel(target, options=self._options))
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def generate(self, prompt: str | None = None, *, messages: Sequence | None = None,
                 token_ids: Sequence[int] | None = None, segments: PromptSegments | None = None,
                 max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool | None = None,
                 logprobs: int | None = None, min_tokens: int | None = None, session_id: str | None = None,
                 tenant: str | None = None, request_id: str | None = None, model: str | None = None,
                 timeout: float | None = None) -> Iterator[GenerateDelta]:
        req = self._request(prompt, messages, token_ids, segments, session_id, tenant, request_id, model,
                            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs,
                            min_tokens=min_tokens)
        return self._stream(req, _Deadline(self.timeout if timeout is None else timeout))

    generate.__doc__ = GENERATE_DOC

    def _stream(self, req: inference_pb2.GenerateRequest, deadline: _Deadline) -> Iterator[GenerateDelta]:
        attempt = 0
        while True:
            call = self._stub.Generate(req, timeout=deadline.remaining(), metadata=self._metadata)
            started = False
            try:
                for msg in call:
                    started = True
                    yield delta_from_proto(msg)
                return
            except grpc.RpcError as e:
                delay = None if started else self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise error_from_rpc(e) from None
            finally:
                call.cancel()  # a no-op when finished; tells the server when the caller stopped reading
            time.sleep(delay)
            attempt += 1

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generate from a text prompt (or `segments=`, `token_ids=`) and return the whole `Completion`
        (keywords as `generate`)."""
        builder = CompletionBuilder()
        for delta in self.generate(prompt, **kwargs):
            builder.add(delta)
        return builder.build()

    def chat(self, messages: Sequence, **kwargs: Any) -> Completion:
        """Generate a reply to chat `messages` ([{"role", "content"}]) and return the `Completion`."""
        builder = CompletionBuilder()
        for delta in self.generate(messages=messages, **kwargs):
            builder.add(delta)
        return builder.build()

    def abort(self, request_id: str) -> bool:
        """Abort a running request; False when the cluster does not know it (any more)."""
        return self._unary(self._stub.Abort, common_pb2.AbortRequest(request_id=request_id)).found

    def list_models(self) -> list[ModelInfo]:
        """The models the cluster serves, with their context length and number of live workers."""
        return models_from_proto(self._unary(self._stub.ListModels, inference_pb2.ListModelsRequest()))

    def explain(self, prompt: str | None = None, *, messages: Sequence | None = None,
                token_ids: Sequence[int] | None = None, segments: PromptSegments | None = None,
                session_id: str | None = None, tenant: str | None = None, model: str | None = None
                ) -> RouteExplanation:
        """Where the router would place this prompt now (prompt forms as `generate`), and every
        candidate's predicted hits by tier, load and cost, without sending it."""
        req = self._request(prompt, messages, token_ids, segments, session_id, tenant, None, model)
        return explanation_from_proto(self._unary(self._stub.Explain, req))

    def _unary(self, method, request):
        deadline, attempt = _Deadline(self.timeout), 0
        while True:
            try:
                return method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise error_from_rpc(e) from None
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """An asyncio client of a kvweave router; same options and methods as `Client`, awaited."""

    def _connect(self) -> None:
        self._channel: grpc.aio.Channel | None = None  # created in the running loop on first use
        self._stub: inference_pb2_grpc.InferenceStub | None = None

    def _get_stub(self) -> inference_pb2_grpc.InferenceStub:
        if self._stub is None:
            self._channel = (grpc.aio.secure_channel(self.target, self._credentials(), options=self._options)
                             if self._tls else grpc.aio.insecure_channel(self.target, options=self._options))
            self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        return self._stub

    def generate(self, prompt: str | None = None, *, messages: Sequence | None = None,
                 token_ids: Sequence[int] | None = None, segments: PromptSegments | None = None,
                 max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool | None = None,
                 logprobs: int | None = None, min_tokens: int | None = None, session_id: str | None = None,
                 tenant: str | None = None, request_id: str | None = None, model: str | None = None,
                 timeout: float | None = None) -> AsyncIterator[GenerateDelta]:
        req = self._request(prompt, messages, token_ids, segments, session_id, tenant, request_id, model,
                            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs,
                            min_tokens=min_tokens)
        return self._stream(req, _Deadline(self.timeout if timeout is None else timeout))

    generate.__doc__ = GENERATE_DOC

    async def _stream(self, req: inference_pb2.GenerateRequest, deadline: _Deadline) -> AsyncIterator[GenerateDelta]:
        attempt = 0
        while True:
            call = self._get_stub().Generate(req, timeout=deadline.remaining(), metadata=self._metadata)
            started = False
            try:
                async for msg in call:
                    started = True
                    yield delta_from_proto(msg)
                return
            except grpc.RpcError as e:
                delay = None if started else self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise error_from_rpc(e) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generate from a text prompt (or `segments=`, `token_ids=`) and return the whole `Completion`
        (keywords as `generate`)."""
        builder = CompletionBuilder()
        async for delta in self.generate(prompt, **kwargs):
            builder.add(delta)
        return builder.build()

    async def chat(self, messages: Sequence, **kwargs: Any) -> Completion:
        """Generate a reply to chat `messages` ([{"role", "content"}]) and return the `Completion`."""
        builder = CompletionBuilder()
        async for delta in self.generate(messages=messages, **kwargs):
            builder.add(delta)
        return builder.build()

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; False when the cluster does not know it (any more)."""
        return (await self._unary("Abort", common_pb2.AbortRequest(request_id=request_id))).found

    async def list_models(self) -> list[ModelInfo]:
        """The models the cluster serves, with their context length and number of live workers."""
        return models_from_proto(await self._unary("ListModels", inference_pb2.ListModelsRequest()))

    async def explain(self, prompt: str | None = None, *, messages: Sequence | None = None,
                      token_ids: Sequence[int] | None = None, segments: PromptSegments | None = None,
                      session_id: str | None = None, tenant: str | None = None, model: str | None = None
                      ) -> RouteExplanation:
        """Where the router would place this prompt now, without sending it (see `Client.explain`)."""
        req = self._request(prompt, messages, token_ids, segments, session_id, tenant, None, model)
        return explanation_from_proto(await self._unary("Explain", req))

    async def _unary(self, name: str, request):
        deadline, attempt = _Deadline(self.timeout), 0
        while True:
            try:
                return await getattr(self._get_stub(), name)(request, timeout=deadline.remaining(),
                                                             metadata=self._metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise error_from_rpc(e) from None
            await asyncio.sleep(delay)
            attempt += 1

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


__all__ = ["AsyncClient", "Client", "Completion", "GenerateDelta", "KVWeaveError", "ModelInfo", "Segment"]
