"""The OpenAI-compatible HTTP server end to end: the official `openai` client and raw HTTP against a
router with 2 real workers (tiny model) and a real Redis."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import openai
import pytest

from kvweave.sampling_params import SamplingParams

MODEL = "tiny-gqa"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def router(cluster):
    return cluster.add_router(max_inflight=8)


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.http_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def expected(tiny_engine_factory, tiny_model_variant):
    """The engine's own greedy outputs: `expected(prompt, max_tokens)` -> RequestOutput."""
    engine = tiny_engine_factory(tiny_model_variant("gqa"))
    return lambda prompt, n: engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]


@dataclass
class Response:
    status_code: int
    text: str
    headers: dict

    def json(self):
        return json.loads(self.text)


def call(router, method: str, path: str, body=None) -> Response:
    """One HTTP request with the standard library (error statuses are returned, not raised)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(router.http_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return Response(resp.status, resp.read().decode(), dict(resp.headers))
    except urllib.error.HTTPError as e:
        return Response(e.code, e.read().decode(), dict(e.headers))


def post(router, path: str, body) -> Response:
    return call(router, "POST", path, body)


def get(router, path: str) -> Response:
    return call(router, "GET", path)


def stream_lines(router, body: dict):
    """The `data: ...` lines of a streamed completion, as they arrive."""
    request = urllib.request.Request(router.http_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        for raw in resp:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data: "):
                yield line


def assert_openai_error(resp: Response, status: int, message: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert error["param"] == param


# -------------------------------------------------------------------------------- the openai client

def test_completion(client, expected):
    want = expected(PROMPT, 10)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(want.prompt_token_ids), 10)
    assert out.usage.total_tokens == len(want.prompt_token_ids) + 10
    assert out.model == MODEL and out.object == "text_completion"


def test_completion_stream(client, expected):
    want = expected(PROMPT, 10)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_of_token_ids(client, expected):
    ids = list(range(5, 45))
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected(ids, 6).text


def test_chat(client, expected):
    want = expected({"messages": MESSAGES}, 8)
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == want.text
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 8 and out.object == "chat.completion"


def test_chat_stream(client, expected):
    want = expected({"messages": MESSAGES}, 8)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_without_max_tokens_runs_to_the_context_length(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 512


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [2, 2, 2]


def test_stop_string(client, expected):
    text = expected(PROMPT, 10).text
    stop = text[3:6]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text and text.startswith(out.choices[0].text)


def test_models_health_metrics(router, client):
    assert [(m.id, m.object) for m in client.models.list().data] == [(MODEL, "model")]
    health = get(router, "/health").json()
    assert health["status"] == "ok" and health["workers"] == 2
    metrics = get(router, "/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert "kvweave_router_stage_seconds_bucket" in metrics.text
    assert "kvweave_router_time_to_first_token_seconds" in metrics.text


# -------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("path, body, message, param", [
    ("/v1/completions", b"{not json", "malformed JSON", None),
    ("/v1/completions", b"[1, 2]", "must be an object", None),
    ("/v1/completions", {"model": MODEL}, "'prompt' is required", "prompt"),
    ("/v1/chat/completions", {"model": MODEL}, "'messages' is required", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "content", None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, "not served", None),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "'temperature' must be a number", "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, "top_p", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n=1", "n"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "'stop'", "stop"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, "not supported", "presence_penalty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "batches", "prompt"),
    ("/v1/completions", {"prompt": list(range(1, 600))}, "context length", None),
    # Values the wire types cannot carry, or that would fail a whole engine step, are refused here.
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**64}, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**40}, "top_k", None),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, "seed", None),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 2**33}, "min_tokens", None),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2**40]}, "stop_token_ids", None),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 65}, "stop", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", None),
    ("/v1/completions", b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper", None),
    ("/v1/completions", b'{"prompt": "hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper", None),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', "not valid Unicode", None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "not valid Unicode", None),
])
def test_bad_requests_get_400_with_an_openai_error(router, path, body, message, param):
    assert_openai_error(post(router, path, body), 400, message, param)
    assert post(router, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_body_over_the_limit_is_413(router):
    resp = post(router, "/v1/completions", {"prompt": "x" * (17 << 20)})
    assert_openai_error(resp, 413, "larger than the limit")
    assert post(router, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_unknown_route_is_404_and_wrong_method_405(router):
    assert_openai_error(get(router, "/v1/nothing"), 404, "Not Found")
    assert_openai_error(get(router, "/v1/completions"), 405, "Method Not Allowed")


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=-2)
    with pytest.raises(openai.BadRequestError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


def test_overload_is_429(cluster):
    router = cluster.add_router(max_inflight=1)
    stream = stream_lines(router, {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "stream": True})
    next(stream)
    assert_openai_error(post(router, "/v1/completions", {"prompt": "hi"}), 429, "in flight")
    stream.close()  # the client goes away: its request is aborted and the router admits again
    deadline = time.monotonic() + 10
    while (router.router.num_inflight or cluster.num_worker_requests()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.num_worker_requests() == 0
    assert post(router, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_no_worker_is_503(make_cluster):
    c = make_cluster(num_workers=0)
    router = c.add_router()
    assert_openai_error(post(router, "/v1/completions", {"prompt": "hi"}), 503, "no worker")
    resp = post(router, "/v1/chat/completions", {"messages": MESSAGES, "stream": True})
    assert_openai_error(resp, 503, "no worker")  # a plain error, not an event stream
    assert get(router, "/health").json()["workers"] == 0


def test_stream_error_after_first_token_is_an_event(make_cluster):
    c = make_cluster()
    router = c.add_router("round_robin")
    stream = stream_lines(router, {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "stream": True})
    events = [next(stream)]
    for w in c.workers:
        c.kill_worker(w)
    events += list(stream)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert "failed mid-stream" in error["message"]  # and could not be migrated: every worker is gone


# -------------------------------------------------------------------------------- vLLM's /tokenize, /detokenize

def test_tokenize_prompt_is_what_the_router_sends(router, client, cluster):
    tok = cluster.tokenizer.tokenizer
    max_model_len = get(router, "/v1/models").json()["data"][0]["max_model_len"]
    resp = post(router, "/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert resp.status_code == 200, resp.text
    ids = tok.encode(PROMPT, add_special_tokens=True)
    assert resp.json() == {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
    usage = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).usage
    assert usage.prompt_tokens == len(ids)
    plain = post(router, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode(PROMPT, add_special_tokens=False)


def test_tokenize_chat_renders_the_template(router, client, cluster):
    tok = cluster.tokenizer.tokenizer
    resp = post(router, "/tokenize", {"model": MODEL, "messages": MESSAGES})
    assert resp.status_code == 200, resp.text
    assert resp.json()["tokens"] == tok.encode_chat(MESSAGES, add_generation_prompt=True)
    usage = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1).usage
    assert usage.prompt_tokens == resp.json()["count"]
    bare = post(router, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["tokens"] == tok.encode_chat(MESSAGES, add_generation_prompt=False)


def test_detokenize_round_trips(router, cluster):
    ids = cluster.tokenizer.tokenizer.encode(PROMPT, add_special_tokens=False)
    resp = post(router, "/detokenize", {"model": MODEL, "tokens": ids})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"prompt": PROMPT}
    assert post(router, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, message, param", [
    ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, "not served", None),
    ("/tokenize", {"model": MODEL}, "'prompt' must be a string", "prompt"),
    ("/tokenize", {"prompt": [1, 2]}, "'prompt' must be a string", "prompt"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, "must be a boolean", "add_special_tokens"),
    ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, "not both", "prompt"),
    ("/tokenize", {"messages": []}, "'messages' is required", "messages"),
    ("/tokenize", {"messages": [{"role": "user"}]}, "content", None),
    ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": 1}, "must be a boolean", "add_generation_prompt"),
    ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, "not supported", "add_special_tokens"),
    ("/tokenize", b"{not json", "malformed JSON", None),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}, "not served", None),
    ("/detokenize", {"model": MODEL}, "'tokens' must be a list", "tokens"),
    ("/detokenize", {"tokens": [1, "2"]}, "'tokens' must be a list", "tokens"),
    ("/detokenize", {"tokens": [1.0]}, "'tokens' must be a list", "tokens"),
    ("/detokenize", {"tokens": [True]}, "'tokens' must be a list", "tokens"),
    ("/detokenize", {"tokens": [-1]}, "not in the vocabulary", "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "not in the vocabulary", "tokens"),
])
def test_tokenize_and_detokenize_reject_bad_input_with_400(router, path, body, message, param):
    assert_openai_error(post(router, path, body), 400, message, param)
