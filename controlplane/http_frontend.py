"""The router's OpenAI-compatible HTTP server (aiohttp).

Routes: POST /v1/completions, POST /v1/chat/completions (`stream: true` as server-sent events,
`data: {...}` chunks ending with `data: [DONE]`), GET /v1/models, vLLM's POST /tokenize (-> {"count",
"max_model_len", "tokens"}: the ids the router would send a worker) and POST /detokenize (->
{"prompt"}), GET /health (liveness: 200 while the process serves), GET /ready (readiness: 200 while a
worker serves the router's model, else 503), GET /metrics (the router's Prometheus metrics), GET /metrics/targets
(every live worker's metrics endpoint in Prometheus's HTTP service-discovery format, docs/metrics.md),
POST /v1/route/explain (a completion or chat body -> the worker the router would choose now and
every candidate's predicted hits by tier, load and cost; nothing is sent: controlplane/explain.py).
Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status
(the table in controlplane/errors.py; 413 for a body over `max_body_bytes`, 404 for an unknown
route, 400 for a body nesting deeper than MAX_JSON_DEPTH or holding a lone surrogate); never a
traceback. An error after an event stream has started is sent as a last
`data: {"error": ...}` event before `data: [DONE]`.

With API keys (controlplane/auth.py), every route but /health, /ready and /metrics (aggregates only) needs
`Authorization: Bearer KEY` (else 401, code "invalid_api_key"); completions, chat, /tokenize,
/detokenize and /v1/route/explain count against the key's rate limits (429 with `Retry-After` seconds), and a request's
cache namespace is its key's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import ssl

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from controlplane.auth import Gate, Tenant
from controlplane.errors import AuthenticationError, RateLimitedError, error_status, public_message
from controlplane.explain import explanation_json
from controlplane.openai_api import (
    OpenAIRequestError, ResponseOptions, chunk_json, error_json, logprobs_json, parse_chat, parse_completion,
    parse_detokenize, parse_tokenize, response_json,
)
from controlplane.router import Delta, GenerateInput, Router
from kvweave.errors import InvalidRequestError
from kvweave.metrics import CONTENT_TYPE
from kvweave.vision_prompt import displayable_ids

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 << 20
"""Room for a chat of text and one image at the default image limit (8 MiB, 10.7 MiB in base64)."""
_ROUTER = web.AppKey("router", Router)
_MAX_BODY = web.AppKey("max_body_bytes", int)
_GATE = web.AppKey("gate", Gate)
_TENANT = web.RequestKey("tenant", Tenant)
"""request[_TENANT]: the caller's auth.Tenant (absent without API keys), set by the `_authenticate` middleware."""
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Routes served without an API key: liveness, readiness and the router's aggregate metrics."""


def json_error(status: int, message: str, err_type: str, param: str | None = None, code=None,
               headers: dict | None = None) -> web.Response:
    return web.json_response(error_json(message, err_type, param, code), status=status, headers=headers)


def _exception_response(e: Exception) -> web.Response:
    status = error_status(e)
    if status.label == "error":
        logger.error("request failed", exc_info=e)
    headers = None
    if isinstance(e, RateLimitedError):
        headers = {"Retry-After": str(e.retry_after_s)}
    elif isinstance(e, AuthenticationError):
        headers = {"WWW-Authenticate": 'Bearer realm="kvweave"'}  # RFC 6750
    return json_error(status.http_status, public_message(e), status.type, getattr(e, "param", None),
                      getattr(e, "error_code", None), headers)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[_MAX_BODY]
        return json_error(413, f"request body is larger than the limit of {limit} bytes (the router's "
                          "--max-body-bytes; images in data URLs take 4/3 of their size)",
                          "invalid_request_error", code="request_too_large")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err_type = "not_found_error" if e.status == 404 else "invalid_request_error"
        return json_error(e.status, f"{request.method} {request.path}: {e.reason}", err_type)
    except Exception as e:
        return _exception_response(e)


@web.middleware
async def _authenticate(request: web.Request, handler) -> web.StreamResponse:
    """The caller's tenant into request[_TENANT]; AuthenticationError (401) without a valid key."""
    if request.path not in OPEN_PATHS:
        tenant = request.app[_GATE].authenticate(request.headers.get("Authorization"))
        if tenant is not None:
            request[_TENANT] = tenant
    return await handler(request)


def _admit(request: web.Request):
    """The rate limits of the caller's key, before the body is read; the request's Grant."""
    return request.app[_GATE].admit(request.get(_TENANT))


MAX_JSON_DEPTH = 32
"""Deepest nesting a request body may have (OpenAI's bodies need 5 or so)."""


async def _read_json(request: web.Request) -> dict:
    if request.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
        # No OpenAI client compresses its requests, and aiohttp's inflater waits forever for the rest
        # of a truncated deflate stream: refused before the body is read.
        raise OpenAIRequestError("compressed request bodies are not supported (Content-Encoding)")
    try:
        raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    except (RequestPayloadError, HttpProcessingError):  # a body that breaks the HTTP parser
        raise OpenAIRequestError("the request body cannot be read") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIRequestError(f"malformed JSON body: {e}") from None
    except ValueError:  # an integer literal past Python's 4300-digit conversion limit
        raise OpenAIRequestError("malformed JSON body: a number has too many digits") from None
    except RecursionError:
        raise OpenAIRequestError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise OpenAIRequestError("the JSON body must be an object")
    _check_json(body)
    return body


def _check_json(body: dict) -> None:
    """A body nests at most MAX_JSON_DEPTH levels and its strings are valid Unicode (JSON's \\u
    escapes can spell a lone surrogate, which no tokenizer or protobuf accepts)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise OpenAIRequestError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for text in (key, item):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise OpenAIRequestError("the JSON body holds a string that is not valid Unicode "
                                                 "(a lone surrogate)") from None
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat)


async def _generate(request: web.Request, parse) -> web.StreamResponse:
    router, grant = request.app[_ROUTER], _admit(request)
    inp, opts = await _parse(request, router, parse)
    inp.tenant = grant.namespace
    return await _respond(request, router, request.app[_GATE].meter(grant, router.generate(inp)), opts)


async def _parse(request: web.Request, router: Router, parse) -> tuple[GenerateInput, ResponseOptions]:
    """The body as the router's input; a body rejected here never reaches the router, so it is counted here."""
    try:
        return parse(await _read_json(request), router.model.name)
    except (InvalidRequestError, web.HTTPRequestEntityTooLarge):
        router.metrics.count_invalid()
        raise


async def _respond(request: web.Request, router: Router, stream, opts: ResponseOptions) -> web.StreamResponse:
    """Answer with the deltas of `stream` (router.generate's, metered)."""
    async with contextlib.aclosing(stream):
        first = await anext(stream)  # errors before the first delta become a plain error response
        if opts.stream:
            return await _stream_events(request, router, opts, first, stream)
        deltas = [first] + [d async for d in stream]
    last = deltas[-1]
    logprobs = logprobs_json(opts, router.tokenizer, [lp for d in deltas for lp in d.logprobs])
    body = response_json(opts, "".join(d.text for d in deltas), last.finish_reason, last.usage, logprobs,
                         last.worker_id)
    return web.json_response(body)


async def _stream_events(request: web.Request, router: Router, opts: ResponseOptions, first: Delta,
                         stream) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        if opts.chat:
            await _send(resp, chunk_json(opts, "", role=True))
        offset, delta = 0, first
        while True:
            logprobs = logprobs_json(opts, router.tokenizer, delta.logprobs, offset)
            offset += len(delta.text)
            if delta.text or delta.finished or logprobs:
                await _send(resp, chunk_json(opts, delta.text, delta.finish_reason, logprobs))
            if delta.finished:
                break
            delta = await anext(stream)
        if opts.include_usage:
            await _send(resp, chunk_json(opts, None, usage=delta.usage, worker_id=delta.worker_id))
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the client went away (closing the stream aborts the request)
    except Exception as e:
        await _send_error(resp, e)
    return resp


async def _send_error(resp: web.StreamResponse, e: Exception) -> None:
    """An error after the event stream started: one error event, then [DONE]."""
    status = error_status(e)
    if status.label == "error":
        logger.error("request failed mid-stream", exc_info=e)
    with contextlib.suppress(ConnectionResetError):
        await _send(resp, error_json(public_message(e), status.type, code=status.http_status))
        await resp.write(b"data: [DONE]\n\n")


async def _send(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


async def models(request: web.Request) -> web.Response:
    router = request.app[_ROUTER]
    data = [{"id": m.id, "object": "model", "created": 0, "owned_by": "kvweave", "max_model_len": m.max_model_len,
             "num_workers": m.num_workers} for m in router.list_models()]
    return web.json_response({"object": "list", "data": data})


async def tokenize(request: web.Request) -> web.Response:
    router = request.app[_ROUTER]
    _admit(request)
    req = parse_tokenize(await _read_json(request))
    router.check_model(req.inp.model)
    inp = await router.fetch_images(req.inp)
    token_ids = router.encode_prompt(inp, req.add_special_tokens, req.add_generation_prompt)[0]
    return web.json_response({"count": len(token_ids), "max_model_len": router.list_models()[0].max_model_len,
                              "tokens": token_ids})


async def detokenize(request: web.Request) -> web.Response:
    router = request.app[_ROUTER]
    _admit(request)
    model, token_ids = parse_detokenize(await _read_json(request))
    router.check_model(model)
    try:
        token_ids = displayable_ids(router.model.vision, router.tokenizer.vocab_size, token_ids)
    except ValueError as e:
        raise OpenAIRequestError(str(e), "tokens") from None
    return web.json_response({"prompt": router.tokenizer.decode(token_ids, skip_special_tokens=False)})


async def route_explain(request: web.Request) -> web.Response:
    """The router's placement of a completion or chat body (`messages` given) without sending it."""
    router, grant = request.app[_ROUTER], _admit(request)
    body = await _read_json(request)
    parse = parse_chat if body.get("messages") is not None else parse_completion
    inp, _ = parse(body, router.model.name)
    inp.tenant = grant.namespace
    return web.json_response(explanation_json(await router.explain(inp)))


async def health(request: web.Request) -> web.Response:
    router = request.app[_ROUTER]
    roles = router.pool.role_counts()
    return web.json_response({"status": "ok", "workers": sum(roles.values()), "roles": roles,
                              "requests_in_flight": router.num_inflight})


async def ready(request: web.Request) -> web.Response:
    """Readiness (a Kubernetes readinessProbe): 200 with the models served and the workers per role
    while a worker serves the router's model, else 503 with an error body (a router without workers
    can only answer 503, so no traffic should reach it)."""
    router = request.app[_ROUTER]
    roles = router.pool.role_counts()
    if not router.ready:
        return json_error(503, f"no worker serves model {router.model.name!r} yet (live workers by role: "
                          f"{roles or 'none'})", "service_unavailable", code="no_worker")
    models = [{"id": m.id, "num_workers": m.num_workers} for m in router.list_models()]
    return web.json_response({"status": "ready", "models": models, "workers": sum(roles.values()), "roles": roles})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_ROUTER].metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


async def metrics_targets(request: web.Request) -> web.Response:
    """Prometheus http_sd: one target group per live worker that serves metrics."""
    groups = [{"targets": [w.info.metrics_target],
               "labels": {"worker": w.worker_id, "role": w.info.role, "model": w.info.model}}
              for w in request.app[_ROUTER].pool.workers.values() if w.info.metrics_target]
    return web.json_response(groups)


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """The Expect header: 100-continue as aiohttp does; anything else a 417 that does not echo the
    value back (aiohttp's default does, and fails with a 500 on a non-ASCII one)."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return json_error(417, "unsupported Expect header (only 100-continue is)", "invalid_request_error", "Expect")
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


async def _no_route(request: web.Request) -> web.StreamResponse:
    """Unknown paths (404) and methods (405), routed here so that `_expect` handles their Expect header."""
    for resource in request.app.router.resources():
        match, allowed = await resource.resolve(request)
        if match is None and allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def build_app(router: Router, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, gate: Gate | None = None
              ) -> web.Application:
    """`gate`: API keys and rate limits (None: open, as without keys)."""
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors, _authenticate])
    app[_ROUTER] = router
    app[_MAX_BODY] = max_body_bytes
    app[_GATE] = gate or Gate()
    app.router.add_post("/v1/completions", completions, expect_handler=_expect)
    app.router.add_post("/v1/chat/completions", chat_completions, expect_handler=_expect)
    app.router.add_get("/v1/models", models, expect_handler=_expect)
    app.router.add_post("/v1/route/explain", route_explain, expect_handler=_expect)
    app.router.add_post("/tokenize", tokenize, expect_handler=_expect)
    app.router.add_post("/detokenize", detokenize, expect_handler=_expect)
    app.router.add_get("/health", health, expect_handler=_expect)
    app.router.add_get("/ready", ready, expect_handler=_expect)
    app.router.add_get("/metrics", metrics, expect_handler=_expect)
    app.router.add_get("/metrics/targets", metrics_targets, expect_handler=_expect)
    app.router.add_route("*", "/{path:.*}", _no_route, expect_handler=_expect)
    return app


async def start_http_server(router: Router, host: str = "127.0.0.1", port: int = 0,
                            max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, gate: Gate | None = None,
                            ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve the OpenAI API on host:port (0 picks a free port), over HTTPS with `ssl_context`;
    returns the runner (`await runner.cleanup()` stops it) and the bound port. Raises OSError when
    the port cannot be bound."""
    # handler_cancellation: a client that disconnects cancels its handler, so that a non-streaming
    # request's work on the worker is cancelled too (a streaming one notices at its next write).
    runner = web.AppRunner(build_app(router, max_body_bytes, gate), access_log=None, handle_signals=False,
                           handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, bound
