"""Fuzzing the edges: thousands of generated requests (400 a test) against a real in-process cluster
(tiny model).

HTTP: bodies of the OpenAI endpoints' shapes (and vLLM's /tokenize, /detokenize) whose fields take
wrong types, huge, negative and non-finite numbers, odd strings (special-token text, control and
bidi characters, long texts) and nested values, plus raw bodies (bytes, truncated and deeply nested
JSON) under odd content types and methods. gRPC: GenerateRequests with random field values through
the router, WorkerGenerateRequests straight to a worker (random token ids, chunk spans, handoff
handles), and undecodable bytes. Every request must end (a per-request timeout is a hang), with no
5xx (HTTP) and no INTERNAL / UNKNOWN / UNAVAILABLE (gRPC); after each run a good request still
succeeds on every server and the engine threads are alive.

Floats are drawn without subnormals: the engine flushes denormals to zero on the threads it runs
on (torch.set_flush_denormal), which may include this test's. Generation is kept cheap:
`max_tokens` is always given, either invalid or at most 2, so a request that happens to be valid
generates at most two tokens. Derandomized, so CI runs the same examples.
"""
from __future__ import annotations

import http.client
import json
import math
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvweave.limits import MAX_BYTES_PER_TOKEN
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.inprocess_cluster import InProcessCluster

REQUEST_TIMEOUT_S = 30.0
"""A request that has not ended after this long is a hang."""
CONTEXT = 512
"""The tiny model's context length."""
BAD_GRPC_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                  grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED}
"""gRPC's 5xx: a server fault, a dead server, or a hang."""
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def cluster(redis_server, tiny_model_variant):
    c = InProcessCluster(redis_server.url, tiny_model_variant("gqa"), num_workers=1).start()
    c.add_router(max_inflight=64)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def http_conn(cluster):
    host, port = cluster.routers[0].http_url.removeprefix("http://").split(":")
    return lambda: http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def router_channel(cluster):
    with grpc.insecure_channel(cluster.routers[0].grpc_address) as channel:
        yield channel


@pytest.fixture(scope="module")
def worker_channel(cluster):
    with grpc.insecure_channel(cluster.workers[0].address) as channel:
        yield channel


# ------------------------------------------------------------------------------------ strategies

SAFE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
ODD_STRINGS = st.sampled_from([
    "", " ", "hi", "<|im_start|>system\nobey", "<|im_end|>", "<|endoftext|>", "\x00\x01\x7f", "\u202e\u200b\ufeff",
    "🙂" * 50, "a" * 5000, "é" * 20_000, "x" * (CONTEXT * MAX_BYTES_PER_TOKEN + 1), "{{ 7*7 }}", "{% raw %}",
    "null", "-1", "1e999", "\n" * 300,
])
STRINGS = st.one_of(ODD_STRINGS, SAFE_TEXT)
INTS = st.one_of(st.sampled_from([0, -1, 1, 2, 3, 20, 21, 511, 512, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1,
                                  2**63, 2**64, -2**63 - 1, 10**30]), st.integers())
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1e-40, 1e-5, 0.5, 1.0, 2.0, 1e6, 1e308, -1.0, math.inf, -math.inf,
                                    math.nan]), st.floats(allow_subnormal=False))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, STRINGS)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(SAFE_TEXT, inner, max_size=4)), max_leaves=12)
MAX_TOKENS = st.sampled_from([0, -1, 1, 2, 2**32, 2**64, 10**30, 1.5, "2", True, [], {}])
"""Invalid, or at most 2 (a valid request stays cheap)."""
ROLES = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "root", "", "USER",
                                   "<|im_start|>system"]), JSON)
PART = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "document", "image_url", "input_audio"]),
                                        "text": STRINGS}), JSON)
MESSAGE = st.one_of(st.fixed_dictionaries(
    {"role": ROLES, "content": st.one_of(STRINGS, st.lists(PART, max_size=3), JSON)},
    optional={"kvweave": st.one_of(st.fixed_dictionaries({"document": st.one_of(st.booleans(), JSON)}), JSON),
              "name": STRINGS}), JSON)
FIELDS = {
    "model": st.one_of(st.sampled_from(["tiny-gqa", "gpt-4", "m" * 300]), JSON),
    "prompt": st.one_of(STRINGS, st.lists(INTS, max_size=8), st.lists(st.integers(0, 600), max_size=40), JSON),
    "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=4), JSON),
    "max_completion_tokens": MAX_TOKENS,
    "temperature": st.one_of(FLOATS, JSON), "top_p": st.one_of(FLOATS, JSON), "top_k": st.one_of(INTS, JSON),
    "seed": st.one_of(INTS, JSON), "n": st.one_of(INTS, JSON), "min_tokens": st.one_of(INTS, JSON),
    "logprobs": st.one_of(st.booleans(), INTS, JSON), "top_logprobs": st.one_of(INTS, JSON),
    "stop": st.one_of(STRINGS, st.lists(STRINGS, max_size=70), JSON),
    "stop_token_ids": st.one_of(st.lists(INTS, max_size=8), JSON),
    "ignore_eos": st.one_of(st.booleans(), JSON), "stream": st.one_of(st.booleans(), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), JSON)}), JSON),
    "kvweave": st.one_of(st.fixed_dictionaries({"chunks": st.one_of(st.lists(st.one_of(
        STRINGS, st.fixed_dictionaries({"text": STRINGS, "reusable": st.one_of(st.booleans(), JSON)})),
        max_size=70), JSON)}), JSON),
    "session_id": st.one_of(STRINGS, JSON), "user": JSON, "presence_penalty": JSON, "logit_bias": JSON,
    "add_special_tokens": JSON, "add_generation_prompt": JSON, "tokens": st.one_of(st.lists(INTS, max_size=8), JSON),
    "unknown_field": JSON,
}
VALID_FIELDS = {
    "temperature": st.sampled_from([0, 0.0, 0.5, 1, 1.5]), "top_p": st.sampled_from([0.5, 1]),
    "top_k": st.sampled_from([-1, 0, 3]), "seed": st.integers(0, 2**63 - 1), "min_tokens": st.sampled_from([0, 1]),
    "stop": st.lists(st.sampled_from(["\n", "the", "<|im_end|>", "🙂"]), max_size=3), "ignore_eos": st.booleans(),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "session_id": st.sampled_from(["", "s1"]), "n": st.just(1), "user": st.just("u"),
    "stop_token_ids": st.lists(st.integers(0, 500), max_size=3),
}
SHORT_TEXT = st.one_of(st.sampled_from(["hi", "<|im_start|>system\nobey<|im_end|>", "\x00", "🙂"]), SAFE_TEXT)


@st.composite
def mostly_valid_bodies(draw) -> dict:
    """A body both completions and chat accept (a prompt and messages), with some valid options and
    at most one field drawn from anything JSON can say."""
    body = {"max_tokens": draw(st.sampled_from([1, 2])), "prompt": draw(SHORT_TEXT.filter(bool)),
            "messages": [{"role": draw(st.sampled_from(["system", "user"])), "content": draw(SHORT_TEXT)},
                         {"role": "user", "content": draw(SHORT_TEXT)}]}
    for name, strategy in VALID_FIELDS.items():
        if draw(st.integers(0, 3)) == 0:
            body[name] = draw(strategy)
    hostile = draw(st.sampled_from([None, "max_tokens", *FIELDS]))
    if hostile is not None:
        body[hostile] = draw(MAX_TOKENS if hostile == "max_tokens" else FIELDS[hostile])
    return body


BODIES = st.one_of(st.fixed_dictionaries({"max_tokens": MAX_TOKENS}, optional=FIELDS), mostly_valid_bodies())
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
KNOWN_HOSTILE = [
    b'{"prompt": "\\ud800", "max_tokens": 1}', b'{"messages": [{"role": "user", "content": "\\udfff"}]}', b"\xff\xfe{}",
    b'{"prompt": "hi", "max_tokens": 1e400}', b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"prompt": "hi", "max_tokens": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", b"null", b"[]", b'"x"',
    b'{"prompt": "hi", "max_tokens": 2147483648}', b'{"prompt": "hi", "max_tokens": 1, "temperature": NaN}',
    b'{"prompt": "hi", "max_tokens": 1, "temperature": 1e-40}', b'{"prompt": "hi", "max_tokens": 1, "seed": -1e30}',
]
"""Bodies the issue saw answered with a 500 or a hang, and their relatives."""
RAW_BODIES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda body, cut: json.dumps(body).encode()[:cut], BODIES, st.integers(0, 200)),
    st.builds(lambda n: b'{"prompt": ' + b"[" * n + b"]" * n + b', "max_tokens": 1}', st.integers(1, 5000)),
    st.sampled_from(KNOWN_HOSTILE))
HEADERS = st.dictionaries(st.sampled_from(["Content-Encoding", "Accept", "Accept-Encoding", "Authorization",
                                           "Expect", "Connection", "X-Request-Id", "Transfer-Encoding"]),
                          st.sampled_from(["gzip", "deflate", "br", "identity", "chunked", "100-continue", "close",
                                           "text/event-stream", "*/*", "", "Bearer " + "x" * 5000, "\u00e9t\u00e9"]),
                          max_size=3).filter(lambda h: h.get("Transfer-Encoding") != "chunked")
"""Odd headers (a body announced as chunked and never sent is a slow client, not a server fault)."""
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1",
                                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"])


def _ids(max_value: int = 2**32 - 1) -> st.SearchStrategy:
    return st.one_of(st.lists(st.integers(0, 600), max_size=40), st.lists(st.integers(0, max_value), max_size=8))


F32 = st.floats(width=32, allow_subnormal=False) | st.sampled_from([math.nan, math.inf, -1.0, 1e-40, 1e-5, 0.0])
SAMPLING_FIELDS = {  # (a valid value, any value the wire type carries)
    "temperature": (st.sampled_from([0.0, 1e-6, 0.3, 1.0, 2.0, 1e6]), F32),
    "top_p": (st.sampled_from([1e-6, 0.1, 0.9, 1.0]), F32),
    "top_k": (st.sampled_from([-1, 0, 1, 5, 2**31 - 1]), st.integers(-2**31, 2**31 - 1)),
    "seed": (st.integers(-2**63, 2**63 - 1), st.integers(-2**63, 2**63 - 1)),
    "logprobs": (st.sampled_from([0, 1, 20]), st.sampled_from([21, 1000, 2**32 - 1])),
    "min_tokens": (st.sampled_from([0, 1, 2]), st.sampled_from([3, 2**32 - 1])),
    "ignore_eos": (st.booleans(), st.booleans()),
}


@st.composite
def sampling(draw) -> common_pb2.SamplingParams:
    """Sampling parameters with at most one field drawn from the whole wire range (most requests stay
    valid, so the engine runs them, side by side with the hostile ones)."""
    hostile = draw(st.sampled_from([None, "max_tokens", "stop", *SAMPLING_FIELDS]))
    msg = common_pb2.SamplingParams(max_tokens=draw(st.sampled_from([0, 2**32 - 1]) if hostile == "max_tokens"
                                                    else st.sampled_from([1, 2])))
    for name, (valid, anything) in SAMPLING_FIELDS.items():
        if name == hostile or draw(st.booleans()):
            setattr(msg, name, draw(anything if name == hostile else valid))
    msg.stop.extend(draw(st.lists(SAFE_TEXT, min_size=65, max_size=70) if hostile == "stop"
                         else st.lists(SAFE_TEXT.filter(bool), max_size=3)))
    msg.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=5)))
    return msg


@st.composite
def generate_requests(draw) -> inference_pb2.GenerateRequest:
    grpc_text = st.one_of(SAFE_TEXT, st.sampled_from(["", "<|im_start|>", "t" * 300, "x" * 40_000]))
    hostile = draw(st.sampled_from([None, None, "request_id", "session_id", "tenant", "model", "prompt"]))
    ids = {name: draw(grpc_text if name == hostile else st.just("") | SAFE_TEXT.map(lambda t: t[:30]))
           for name in ("request_id", "session_id", "tenant")}
    model = draw(st.sampled_from(["x", "m" * 300]) if hostile == "model" else st.sampled_from(["", "tiny-gqa"]))
    req = inference_pb2.GenerateRequest(model=model, sampling=draw(sampling()), **ids)
    kind = draw(st.sampled_from(["none"]) if hostile == "prompt" else
                st.sampled_from(["text", "chat", "token_ids", "segments"]))
    if kind == "text":
        req.text = draw(grpc_text)
    elif kind == "chat":
        for _ in range(draw(st.integers(0, 4))):
            req.chat.messages.add(role=draw(st.sampled_from(["user", "system", "assistant", "tool", "user", "x"])),
                                  content=draw(grpc_text), document=draw(st.booleans()))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(_ids()))
    elif kind == "segments":
        for _ in range(draw(st.integers(0, 5) | st.integers(0, 70))):
            req.segments.segments.add(text=draw(grpc_text), reusable=draw(st.booleans()))
    return req


@st.composite
def worker_requests(draw) -> worker_pb2.WorkerGenerateRequest:
    ids = draw(st.lists(st.integers(0, 300), min_size=1, max_size=40) | _ids())
    req = worker_pb2.WorkerGenerateRequest(request_id=draw(st.just("") | SAFE_TEXT | st.just("r" * 300)),
                                           prompt_token_ids=ids,
                                           sampling=draw(sampling()), cache_namespace=draw(SAFE_TEXT),
                                           prefill_only=draw(st.booleans()))
    for _ in range(draw(st.sampled_from([0, 0, 1, 3]))):
        req.chunks.add(start=draw(st.integers(0, 50) | st.just(2**32 - 1)),
                       length=draw(st.integers(0, 50) | st.just(2**32 - 1)))
    if draw(st.integers(0, 5)) == 0:
        h = req.kv_handoff
        h.handoff_id, h.source_address = draw(SAFE_TEXT), draw(st.sampled_from(["", "127.0.0.1:1", "nowhere:x"]))
        h.block_keys.extend(draw(st.lists(st.binary(min_size=0, max_size=17), max_size=4)))
        h.num_tokens, h.block_size = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0, 1, 16, 2**32 - 1]))
        h.first_token_id, h.sampler_state = draw(st.integers(0, 2**32 - 1)), draw(st.binary(max_size=20))
        h.ttl_s = draw(st.floats(width=32, allow_subnormal=False))
    return req


# ------------------------------------------------------------------------------------ checks

def _post(conn_factory, method: str, path: str, body: bytes, content_type: str,
          headers: dict | None = None) -> tuple[int, bytes, str]:
    """(status, body, content type) of one HTTP request on a fresh connection."""
    conn = conn_factory()
    try:
        conn.request(method, path, body=body,
                     headers=({"Content-Type": content_type} if content_type else {}) | (headers or {}))
        resp = conn.getresponse()  # raises TimeoutError on a hang
        return resp.status, resp.read(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


def _check_http(status: int, data: bytes, content_type: str, seen: Counter) -> None:
    """No 5xx; our 400s are OpenAI's error object (aiohttp's own, for requests that are not HTTP
    enough to reach a handler, are plain text)."""
    seen[status] += 1
    assert status < 500, data[:500]
    if status == 400 and content_type.startswith("application/json"):
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"} and len(error["message"]) < 1000
        assert "Traceback" not in error["message"]


def _response_of(future):
    """A unary call's response as a stream of one (its error raised while iterating)."""
    yield future.result()


def _check_grpc(call, seen: Counter) -> None:
    try:
        for _ in call:
            pass
        seen[grpc.StatusCode.OK] += 1
    except grpc.RpcError as e:
        seen[e.code()] += 1
        assert e.code() not in BAD_GRPC_CODES, f"{e.code()}: {e.details()}"
        assert len(e.details() or "") < 1000 and "Traceback" not in (e.details() or "")


def _assert_alive(cluster, conn_factory, router_channel, worker_channel) -> None:
    """Every server still answers a good request, and the engine thread still runs."""
    status, data, _ = _post(conn_factory, "POST", "/v1/completions",
                         json.dumps({"prompt": "hi", "max_tokens": 2}).encode(), "application/json")
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] >= 1
    sampling = common_pb2.SamplingParams(max_tokens=2, temperature=0.0)
    out = list(inference_pb2_grpc.InferenceStub(router_channel).Generate(
        inference_pb2.GenerateRequest(text="hi", sampling=sampling), timeout=REQUEST_TIMEOUT_S))
    assert out[-1].finished
    out = list(worker_pb2_grpc.WorkerStub(worker_channel).Generate(
        worker_pb2.WorkerGenerateRequest(prompt_token_ids=[5, 6, 7], sampling=sampling), timeout=REQUEST_TIMEOUT_S))
    assert out[-1].finished
    assert all(w.engine._thread.is_alive() for w in cluster.workers)


# ------------------------------------------------------------------------------------ the fuzz tests

def test_fuzz_http_json(cluster, http_conn, router_channel, worker_channel):
    seen = Counter()

    @FUZZ
    @given(path=PATHS, body=BODIES)
    def one(path, body):
        _check_http(*_post(http_conn, "POST", path, json.dumps(body).encode(), "application/json"), seen)

    one()
    assert seen[200] and seen[400], seen  # both the valid and the refused paths were exercised
    print("HTTP JSON:", dict(seen))
    _assert_alive(cluster, http_conn, router_channel, worker_channel)


def test_fuzz_http_raw(cluster, http_conn, router_channel, worker_channel):
    methods = st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE"])
    paths = st.one_of(PATHS, st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/../v1/models", "/%ff"]))

    seen = Counter()
    for body in KNOWN_HOSTILE:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            _check_http(*_post(http_conn, "POST", path, body, "application/json"), seen)

    @FUZZ
    @given(method=methods, path=paths, body=RAW_BODIES, content_type=CONTENT_TYPES, headers=HEADERS)
    def one(method, path, body, content_type, headers):
        _check_http(*_post(http_conn, method, path, body, content_type, headers), seen)

    one()
    assert seen[400] and seen[405], seen
    _assert_alive(cluster, http_conn, router_channel, worker_channel)


def test_fuzz_router_grpc(cluster, http_conn, router_channel, worker_channel):
    stub = inference_pb2_grpc.InferenceStub(router_channel)
    raw = router_channel.unary_stream("/kvweave.v1.Inference/Generate")
    raw_abort = router_channel.unary_unary("/kvweave.v1.Inference/Abort")

    seen, garbage_seen = Counter(), Counter()

    @FUZZ
    @given(request=generate_requests(), garbage=st.one_of(st.none(), st.binary(min_size=1, max_size=100)))
    def one(request, garbage):
        _check_grpc(stub.Generate(request, timeout=REQUEST_TIMEOUT_S), seen)
        if garbage is not None:
            _check_garbage(raw(garbage, timeout=REQUEST_TIMEOUT_S), garbage_seen)
            _check_garbage(_response_of(raw_abort.future(garbage, timeout=REQUEST_TIMEOUT_S)), garbage_seen)

    one()
    assert seen[grpc.StatusCode.OK] and seen[grpc.StatusCode.INVALID_ARGUMENT], seen
    assert garbage_seen[grpc.StatusCode.INVALID_ARGUMENT], garbage_seen
    print("router gRPC:", dict(seen), "undecodable:", dict(garbage_seen))
    _assert_alive(cluster, http_conn, router_channel, worker_channel)


def test_fuzz_worker_grpc(cluster, http_conn, router_channel, worker_channel):
    stub = worker_pb2_grpc.WorkerStub(worker_channel)
    raw = worker_channel.unary_stream("/kvweave.v1.Worker/Generate")
    seen, garbage_seen = Counter(), Counter()

    @FUZZ
    @given(request=worker_requests(), garbage=st.one_of(st.none(), st.binary(min_size=1, max_size=100)))
    def one(request, garbage):
        _check_grpc(stub.Generate(request, timeout=REQUEST_TIMEOUT_S), seen)
        if garbage is not None:
            _check_garbage(raw(garbage, timeout=REQUEST_TIMEOUT_S), garbage_seen)

    one()
    assert seen[grpc.StatusCode.OK] and seen[grpc.StatusCode.INVALID_ARGUMENT], seen
    assert garbage_seen[grpc.StatusCode.INVALID_ARGUMENT], garbage_seen
    print("worker gRPC:", dict(seen), "undecodable:", dict(garbage_seen))
    _assert_alive(cluster, http_conn, router_channel, worker_channel)


def _check_garbage(call, seen: Counter) -> None:
    """Bytes that may not decode as the request: INVALID_ARGUMENT (kvweave/grpc_decode.py), or they
    decode as some request, which is then checked as any other."""
    _check_grpc(call, seen)
