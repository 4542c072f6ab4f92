"""Prompts with reusable chunks end to end: a real router (gRPC + HTTP) in front of 2 real workers on
the tiny model and a real Redis. Each worker's engine records the request it was handed (token ids
and chunk spans, through the engine's pre-admission hook), so the tests check what reached the
engine against `kvweave.segments`; bad inputs must be a clear 400 / INVALID_ARGUMENT while the
cluster keeps serving."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

import kvweave
from controlplane.procs import child_env, stop_process
from controlplane.router import Router, RouterConfig
from controlplane.router_main import RouterServer, ServeOptions
from kvweave.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvweave.segments import encode_chat_documents, encode_segments, split_on_separator

DOC_A = "Retrieved documents, system prompts and tool outputs recur across requests."
DOC_B = "The quick brown fox jumps over the lazy dog."
QUESTION = " Question: which animal jumps?"
SEP = "<<doc>>"
LONG_DOC = "Prefill and decode can run on separate workers; tokens stream back to the client. " * 40


class Response:
    def __init__(self, status_code: int, text: str) -> None:
        self.status_code, self.text = status_code, text

    def json(self) -> dict:
        return json.loads(self.text)


def post(router, path: str, body: dict) -> Response:
    """One HTTP POST with the standard library (error statuses are returned, not raised)."""
    request = urllib.request.Request(router.http_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return Response(resp.status, resp.read().decode())
    except urllib.error.HTTPError as e:
        return Response(e.code, e.read().decode())


def assert_openai_error(resp: Response, status: int, message: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert error["param"] == param


@pytest.fixture(scope="module")
def seen(cluster):
    """req_id -> (prompt token ids, chunk spans) of every request a worker's engine admitted."""
    records: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
    saved = []
    for worker in cluster.workers:
        engine = worker.engine
        saved.append((engine, engine.prefetch))

        async def record(req, inner=engine.prefetch):
            records[req.req_id] = (list(req.prompt_token_ids), [tuple(s) for s in req.chunk_spans])
            if inner is not None:
                await inner(req)
        engine.prefetch = record
    yield records
    for engine, prefetch in saved:
        engine.prefetch = prefetch


@pytest.fixture(scope="module")
def router(cluster):
    return cluster.add_router()


@pytest.fixture(scope="module")
def sep_router(cluster):
    """A router that splits plain prompts at SEP and allows at most 3 chunks."""
    config = RouterConfig(redis_url=cluster.redis_url, model=str(cluster.model), lease_s=1.0, refresh_s=0.1,
                          chunk_separator=SEP, max_chunks_per_request=3)
    server = RouterServer(config, ServeOptions(grace_s=0.5), Router(config, cluster.tokenizer))
    cluster.run(server.start())
    cluster.routers.append(server)
    return server


@pytest.fixture(scope="module")
def tok(cluster):
    return cluster.tokenizer.tokenizer


def stub_for(router) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(router.grpc_address))


def greedy(max_tokens: int = 3) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_grpc(stub, **fields) -> inference_pb2.GenerateResponse:
    last = None
    for msg in stub.Generate(inference_pb2.GenerateRequest(sampling=greedy(), **fields), timeout=60):
        last = msg
    return last


def segments_proto(segments) -> common_pb2.Segments:
    return common_pb2.Segments(segments=[common_pb2.Segment(text=t, reusable=r) for t, r in segments])


def check_usage(usage, prompt_tokens: int) -> None:
    """The usage fields are wired: prompt count, and reuse counts that add up."""
    assert usage.prompt_tokens == prompt_tokens
    assert 0 <= usage.recomputed_tokens <= usage.chunk_reused_tokens
    assert usage.cached_tokens + usage.chunk_reused_tokens <= prompt_tokens


def check_usage_json(usage: dict, prompt_tokens: int) -> None:
    ext = usage["kvweave"]
    assert set(ext) == {"computed_tokens", "prefix_reused_tokens", "chunk_reused_tokens", "recomputed_tokens",
                        "worker_id", "route"}  # route: the router's prediction (tests/controlplane/test_route_explain.py)
    assert ext["worker_id"] in {"w0", "w1"}  # the serving worker (tests/controlplane/conftest.py names them)
    assert usage["prompt_tokens"] == prompt_tokens
    assert ext["prefix_reused_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert ext["computed_tokens"] == (prompt_tokens - ext["prefix_reused_tokens"] - ext["chunk_reused_tokens"]
                                      + ext["recomputed_tokens"])
    assert 0 <= ext["recomputed_tokens"] <= ext["chunk_reused_tokens"]


def assert_still_serving(router) -> None:
    assert run_grpc(stub_for(router), text="Hello there").finished


# -------------------------------------------------------------------------------- gRPC

def test_grpc_segments_reach_the_engine_with_their_spans(router, seen, tok):
    segments = [("Context: ", False), (DOC_A, True), (DOC_B, True), (QUESTION, False)]
    last = run_grpc(stub_for(router), request_id="seg-1", segments=segments_proto(segments))
    want_ids, want_spans = encode_segments(tok, segments)
    assert seen["seg-1"] == (want_ids, want_spans)
    assert [tok.decode(want_ids[a:a + n]) for a, n in want_spans] == [DOC_A, DOC_B]
    assert last.finished
    check_usage(last.usage, len(want_ids))


def test_grpc_chat_document_messages(router, seen, tok):
    chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="system", content=DOC_A, document=True),
                                             common_pb2.ChatMessage(role="user", content="Summarize it.")])
    last = run_grpc(stub_for(router), request_id="chat-doc-1", chat=chat)
    messages = [{"role": "system", "content": DOC_A, "kvweave": {"document": True}},
                {"role": "user", "content": "Summarize it."}]
    want = encode_chat_documents(tok, messages)
    assert seen["chat-doc-1"] == want and len(want[1]) == 1
    check_usage(last.usage, len(want[0]))


def test_sdk_segments_and_usage(router, seen, tok):
    segments = [kvweave.Segment(DOC_B, reusable=True), {"text": QUESTION}]
    with kvweave.Client(router.grpc_address, timeout=60) as client:
        done = client.complete(None, segments=segments, max_tokens=2, temperature=0, ignore_eos=True,
                               request_id="sdk-seg-1")
        reply = client.chat([{"role": "user", "content": DOC_A, "kvweave": {"document": True}}], max_tokens=2,
                            request_id="sdk-chat-1")
    want = encode_segments(tok, [(DOC_B, True), (QUESTION, False)])
    assert seen["sdk-seg-1"] == want
    check_usage(done.usage, len(want[0]))
    assert done.usage.chunk_reused_tokens >= 0 and done.usage.recomputed_tokens >= 0
    assert seen["sdk-chat-1"][1] == encode_chat_documents(tok, [{"role": "user", "content": DOC_A,
                                                                  "kvweave": {"document": True}}])[1]
    check_usage(reply.usage, len(seen["sdk-chat-1"][0]))


@pytest.mark.parametrize("segments, message", [
    ([None], "segment 0 must be"),
    ([{"text": "", "reusable": True}], "segment 0 has an empty text"),
    ([{"text": "a", "reusable": "yes"}], "segment 0: reusable must be a boolean"),
    ([{"txt": "a"}], "unknown key(s) txt"),
    ([], "segments must not be empty"),
])
def test_sdk_rejects_malformed_segments_before_sending(segments, message):
    client = kvweave.Client("127.0.0.1:1")  # never dialled: the request fails to build
    try:
        with pytest.raises(kvweave.InvalidRequest) as exc:
            client.generate(segments=segments)
        assert message in exc.value.message
    finally:
        client.close()


@pytest.mark.parametrize("fields, message", [
    ({"segments": common_pb2.Segments()}, "segments must be a non-empty list"),
    ({"segments": segments_proto([("Hello", False), ("", True)])}, "segment 1 has an empty text"),
    ({"segments": segments_proto([(f"doc {i}. ", True) for i in range(65)])}, "65 reusable chunks; at most 64"),
    ({"segments": segments_proto([("Intro ", False), (LONG_DOC, True)])},
     "reusable chunk 0 has {n} tokens, more than the context length 512"),
    ({"chat": common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content="", document=True)])},
     "the document is empty"),
])
def test_grpc_invalid_chunks_are_invalid_argument(router, tok, fields, message):
    stub = stub_for(router)
    with pytest.raises(grpc.RpcError) as exc:
        run_grpc(stub, **fields)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message.format(n=len(tok.encode(LONG_DOC))) in exc.value.details()
    assert_still_serving(router)


def test_worker_validates_the_spans_it_is_sent(cluster, seen):
    """The worker service passes `chunks` to the engine, which rejects spans that are not sorted and
    disjoint, and admits valid ones as they are."""
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(cluster.workers[0].address))
    ids = list(range(5, 45))

    def call(req_id, spans):
        request = worker_pb2.WorkerGenerateRequest(
            request_id=req_id, prompt_token_ids=ids, sampling=greedy(1),
            chunks=[common_pb2.ChunkSpan(start=a, length=n) for a, n in spans])
        return list(stub.Generate(request, timeout=60))[-1]

    last = call("w-spans-ok", [(0, 10), (20, 16)])
    assert seen["w-spans-ok"] == (ids, [(0, 10), (20, 16)])
    check_usage(last.usage, len(ids))
    for spans, message in (([(0, 10), (5, 10)], "sorted and disjoint"), ([(30, 20)], "past the end")):
        with pytest.raises(grpc.RpcError) as exc:
            call("w-spans-bad", spans)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in exc.value.details()
    assert call("w-spans-after", []).finished


# -------------------------------------------------------------------------------- HTTP

def test_http_completion_chunks_then_prompt(router, seen, tok):
    body = {"model": "tiny-gqa", "prompt": QUESTION, "max_tokens": 2,
            "kvweave": {"chunks": [DOC_A, {"text": "Context follows.", "reusable": False}, {"text": DOC_B}]}}
    resp = post(router, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    want = encode_segments(tok, [(DOC_A, True), ("Context follows.", False), (DOC_B, True), (QUESTION, False)])
    assert seen[out["id"]] == want
    check_usage_json(out["usage"], len(want[0]))


def test_http_with_the_openai_client(router, seen, tok):
    client = openai.OpenAI(base_url=router.http_url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="tiny-gqa", prompt=QUESTION, max_tokens=2,
                                    extra_body={"kvweave": {"chunks": [DOC_B]}})
    want = encode_segments(tok, [(DOC_B, True), (QUESTION, False)])
    assert seen[out.id] == want
    assert out.usage.prompt_tokens == len(want[0])
    assert out.usage.model_extra["kvweave"]["computed_tokens"] >= 0


def test_http_chat_documents(router, seen, tok):
    messages = [{"role": "system", "content": DOC_A, "kvweave": {"document": True}},
                {"role": "user", "content": [{"type": "text", "text": "Read: "}, {"type": "document", "text": DOC_B},
                                             {"type": "text", "text": QUESTION}]}]
    resp = post(router, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    want = encode_chat_documents(tok, messages)
    assert seen[out["id"]] == want
    assert [tok.decode(want[0][a:a + n]) for a, n in want[1]] == [DOC_A, DOC_B]
    check_usage_json(out["usage"], len(want[0]))


def test_streamed_usage_has_the_kvweave_fields(router):
    client = openai.OpenAI(base_url=router.http_url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="tiny-gqa", max_tokens=2, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": DOC_B, "kvweave": {"document": True}}]))
    check_usage_json(chunks[-1].usage.model_dump(), chunks[-1].usage.prompt_tokens)


@pytest.mark.parametrize("path, body, message, param", [
    ("/v1/completions", {"kvweave": {"chunks": []}}, "'kvweave.chunks' must be a non-empty list", "kvweave.chunks"),
    ("/v1/completions", {"kvweave": {"chunks": ["a", ""]}}, "kvweave.chunks[1] has an empty text", "kvweave.chunks"),
    ("/v1/completions", {"kvweave": {"chunks": [{"text": "a", "reusable": "yes"}]}},
     "kvweave.chunks[0]: 'reusable' must be a boolean, got str", "kvweave.chunks"),
    ("/v1/completions", {"kvweave": {"chunks": [{"reusable": True}]}}, "kvweave.chunks[0] must be a string",
     "kvweave.chunks"),
    ("/v1/completions", {"kvweave": {"chunks": [7]}}, "kvweave.chunks[0] must be a string", "kvweave.chunks"),
    ("/v1/completions", {"kvweave": {"chunks": ["a"], "extra": 1}}, "unknown field(s) extra", "kvweave"),
    ("/v1/completions", {"kvweave": {"chunks": ["a"]}, "prompt": [1, 2]}, "'prompt' must be a string", "prompt"),
    ("/v1/completions", {"kvweave": {"chunks": [f"doc {i}. " for i in range(65)]}},
     "the request has 65 reusable chunks; at most 64 are allowed", None),
    ("/v1/completions", {"kvweave": {"chunks": [LONG_DOC]}, "prompt": "Q"},
     "reusable chunk 0 has {n} tokens, more than the context length 512", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "kvweave": {"document": 1}}]},
     "messages[0]['kvweave']['document'] must be a boolean, got int", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "does not take images", "messages"),  # a text-only model (images: tests/controlplane/test_vlm_http.py)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "a 'document' part needs a string 'text'", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "document", "text": ""}]}]},
     "the document is empty", "messages"),
])
def test_http_invalid_chunks_are_400(router, tok, path, body, message, param):
    resp = post(router, path, {"max_tokens": 2, **body})
    assert_openai_error(resp, 400, message.format(n=len(tok.encode(LONG_DOC))), param)
    assert resp.json()["error"]["type"] == "invalid_request_error"
    ok = post(router, "/v1/completions", {"prompt": "Hello", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


# -------------------------------------------------------------------------------- --chunk-separator

def test_separator_splits_plain_prompts(router, sep_router, seen, tok):
    prompt = f"Context:{SEP}{DOC_A}{SEP}{DOC_B}{SEP}{QUESTION}"
    out = post(sep_router, "/v1/completions", {"prompt": prompt, "max_tokens": 1}).json()
    want = encode_segments(tok, split_on_separator(prompt, SEP))
    assert seen[out["id"]] == want
    assert [tok.decode(want[0][a:a + n]) for a, n in want[1]] == [DOC_A, DOC_B]
    # over gRPC too; a prompt without the separator is tokenized as usual
    last = run_grpc(stub_for(sep_router), request_id="sep-grpc", text=prompt)
    assert seen["sep-grpc"] == want and last.finished
    run_grpc(stub_for(sep_router), request_id="sep-none", text=QUESTION)
    assert seen["sep-none"] == (tok.encode(QUESTION, add_special_tokens=True), [])
    # a router without a separator leaves it in the text
    run_grpc(stub_for(router), request_id="sep-off", text=prompt)
    assert seen["sep-off"] == (tok.encode(prompt, add_special_tokens=True), [])


def test_separator_router_limits(sep_router):
    too_many = SEP.join(["Intro", "a", "b", "c", "d", "Question"])
    assert_openai_error(post(sep_router, "/v1/completions", {"prompt": too_many, "max_tokens": 1}), 400,
                        "the request has 4 reusable chunks; at most 3 are allowed")
    with pytest.raises(grpc.RpcError) as exc:
        run_grpc(stub_for(sep_router), text=f"Intro{SEP}a{SEP}{SEP}Q")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk 1 of the prompt" in exc.value.details()
    assert_still_serving(sep_router)


# -------------------------------------------------------------------------------- the CLI

def test_cli_flags():
    from cli.main import build_parser
    from cli.serve import router_env

    args = build_parser("router").parse_args(["router", "--chunk-separator", SEP, "--max-chunks-per-request", "8"])
    assert (args.chunk_separator, args.max_chunks_per_request) == (SEP, 8)
    assert build_parser("router").parse_args(["router"]).chunk_separator is None
    serve = build_parser("serve").parse_args(["serve", "--chunk-separator", SEP, "--max-chunks-per-request", "8"])
    assert router_env(serve) == {"KVWEAVE_CHUNK_SEPARATOR": SEP, "KVWEAVE_MAX_CHUNKS_PER_REQUEST": "8"}
    assert "KVWEAVE_CHUNK_SEPARATOR" not in router_env(build_parser("serve").parse_args(["serve"]))


def test_router_process_takes_the_separator_from_its_environment(cluster, seen, tok):
    """How `kvweave serve` configures its router: KVWEAVE_CHUNK_SEPARATOR in the child's environment."""
    env = child_env(KVWEAVE_CHUNK_SEPARATOR=SEP)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "router", "--port", "0", "--http-port", "0",
                             "--redis-url", cluster.redis_url, "--model", str(cluster.model)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("kvweave router ready: grpc 127.0.0.1:"), proc.stderr.read() if not line else line
        stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(line.split()[4]))
        deadline = time.monotonic() + 20
        while stub.ListModels(inference_pb2.ListModelsRequest()).models[0].num_workers < len(cluster.workers):
            assert time.monotonic() < deadline, "the router did not see the workers"
            time.sleep(0.05)
        prompt = f"Intro{SEP}{DOC_A}{SEP}{QUESTION}"
        run_grpc(stub, request_id="cli-sep", text=prompt)
        assert seen["cli-sep"] == encode_segments(tok, split_on_separator(prompt, SEP))
    finally:
        stop_process(proc)
