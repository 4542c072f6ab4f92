"""`kvweave loadgen` on bad input (a clear message and a non-zero exit, never a traceback), and the
OpenAI backend against a scripted OpenAI-compatible server: what it sends, what it measures, and
how it counts the failures the server makes."""
from __future__ import annotations

import asyncio
import json
import signal
import threading

import pytest
from aiohttp import web

from controlplane.procs import free_port
from cli.main import main
from loadgen_helpers import interrupt_loadgen, workload_sessions

TINY = ["--token-range", "10:500", "--input-len", "8", "--output-len", "3"]
USAGE = {"prompt_tokens": 7, "prompt_tokens_details": {"cached_tokens": 4},
         "kvweave": {"chunk_reused_tokens": 2, "recomputed_tokens": 1, "disaggregation": "remote",
                     "prefill_worker_id": "p0", "worker_id": "d0"}}


class FakeOpenAI:
    """An OpenAI-compatible server whose i-th request behaves as `script[i % len(script)]`: "ok" (a
    stream of max_tokens pieces with usage), "500" (an error response), "broken" (the stream ends
    without [DONE]) or "error_event" (an error event mid-stream, as kvweave's router sends one)."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.requests = script, []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        mode = self.script[len(self.requests) % len(self.script)]
        self.requests.append((request.path, body, request.headers.get("Authorization")))
        if mode == "500":
            return web.json_response({"error": {"message": "scripted failure", "type": "internal_error"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chat = request.path.endswith("chat/completions")

        async def send(obj: dict) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        if chat:
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for k in range(body["max_tokens"]):
            if mode == "error_event" and k == 1:
                await send({"error": {"message": "worker w1 failed", "type": "worker_error", "code": 502}})
                break
            text = {"delta": {"content": f"w{k} "}} if chat else {"text": f"w{k} "}
            finish = "length" if k == body["max_tokens"] - 1 else None
            await send({"choices": [{"index": 0, **text, "finish_reason": finish}]})
            await asyncio.sleep(0.002)
        if mode == "broken":
            return resp
        if mode == "ok":
            await send({"choices": [], "usage": USAGE | {"completion_tokens": body["max_tokens"]}})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self.runner = web.AppRunner(app)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(10)
        self.port = free_port()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(site.start(), self.loop).result(10)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fake_openai():
    servers: list[FakeOpenAI] = []

    def start(script: list[str]) -> tuple[FakeOpenAI, str]:
        servers.append(FakeOpenAI(script))
        return servers[-1], servers[-1].start()

    yield start
    for server in servers:
        server.stop()


def loadgen(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    rc = main(["loadgen", "--no-progress", "--json", str(out), *args])
    return rc, json.loads(out.read_text())


def test_server_failures_are_counted_by_kind(fake_openai, tmp_path) -> None:
    server, url = fake_openai(["ok", "500", "ok", "broken", "ok", "error_event"])
    rc, result = loadgen(tmp_path, "--backend", "openai", "--url", url + "/v1/", "--num-requests", "12",
                         "--max-concurrency", "1", "--api-key", "sk-test", *TINY)
    assert rc == 0
    assert (result["completed"], result["failed"]) == (6, 6)
    assert result["errors_by_kind"] == {"http_500": 2, "stream_broken": 2, "http_502": 2}
    assert any("HTTP 500: scripted failure" in e for e in result["errors"])
    assert any("worker w1 failed" in e for e in result["errors"])
    assert result["total_output_tokens"] == 6 * 3 and result["total_input_tokens"] == 6 * 7
    assert (result["total_cached_tokens"], result["total_chunk_reused_tokens"], result["total_recomputed_tokens"]) \
        == (24, 12, 6)
    assert all(len(itls) == 2 for itls, e in zip(result["itls"], result["errors"]) if not e)
    assert result["requests_by_disaggregation"] == {"remote": 6} and result["requests_by_prefill_worker"] == {"p0": 6}
    assert result["requests_by_worker"] == {"d0": 6} and result["latency_by_prefill"]["remote"]["completed"] == 6
    path, body, auth = server.requests[0]
    assert path == "/v1/completions" and auth == "Bearer sk-test"
    assert body["model"] == "fake-model" and len(body["prompt"]) == 8 and body["max_tokens"] == 3
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and "kvweave" not in body
    assert "api_key" not in result["config"]


def test_chat_and_segments_requests(fake_openai, tmp_path) -> None:
    server, url = fake_openai(["ok"])
    rc, result = loadgen(tmp_path, "--backend", "openai", "--url", url, "--num-requests", "2", "--max-concurrency",
                         "1", "--workload", "multi-turn", "--num-turns", "2", "--turn-input-len", "4",
                         "--output-len", "3", "--no-ignore-eos", "--temperature", "0.5")
    assert rc == 0 and result["completed"] == 2
    (path0, body0, _), (path1, body1, _) = server.requests
    assert path0 == path1 == "/v1/chat/completions"
    assert body0["ignore_eos"] is False and body0["temperature"] == 0.5
    assert body1["messages"][:2] == [*body0["messages"], {"role": "assistant", "content": "w0 w1 w2 "}]
    dataset = tmp_path / "rag.json"
    dataset.write_text(json.dumps([{"question": "Why?", "ctxs": [{"title": "T", "text": "Because."}]}]))
    rc, _ = loadgen(tmp_path, "--backend", "openai", "--url", url, "--num-requests", "1", "--workload", "rag",
                    "--dataset", str(dataset), "--num-docs", "1")
    path, body, _ = server.requests[-1]
    assert rc == 0 and path == "/v1/completions" and body["prompt"] == ""
    assert [c["reusable"] for c in body["kvweave"]["chunks"]] == [False, True, False]
    assert body["kvweave"]["chunks"][1]["text"] == "Title: T\nBecause.\n"


def test_multimodal_requests_carry_the_workloads_images_as_data_urls(fake_openai, tmp_path) -> None:
    from loadgen.backends import openai_message

    server, url = fake_openai(["ok"])
    args = ["--num-images", "3", "--images-per-request", "1:2", "--text-share", "0.25", "--output-len", "2",
            "--seed", "7"]
    rc, result = loadgen(tmp_path, "--backend", "openai", "--url", url, "--num-requests", "8", "--max-concurrency",
                         "1", "--workload", "multimodal", "--image-size", "24x16:48x40", *args)
    assert rc == 0 and result["completed"] == 8
    sessions = workload_sessions("--workload", "multimodal", "--image-size", "24x16:48x40", *args, n=8)
    assert [body["messages"] for _, body, _ in server.requests] == [
        [openai_message(s.turns[0].messages[0])] for s in sessions]
    assert any("image_url" in json.dumps(body) for _, body, _ in server.requests)
    classes = {s.tags["class"] for s in sessions}
    assert set(result["latency_by_class"]) == classes == {"text", "image_first", "image_repeat"}
    images = [i for s in sessions for i in s.tags["images"]]
    assert (result["images_sent"], result["distinct_images"]) == (len(images), len(set(images)))


def test_a_model_the_server_does_not_serve(fake_openai, capsys) -> None:
    _, url = fake_openai(["ok"])
    assert main(["loadgen", "--backend", "openai", "--url", url, "--model", "other", *TINY]) == 1
    assert "model 'other' is not served" in capsys.readouterr().err


def test_every_request_failing_exits_1(fake_openai, tmp_path, capsys) -> None:
    _, url = fake_openai(["500"])
    rc, result = loadgen(tmp_path, "--backend", "openai", "--url", url, "--num-requests", "3", *TINY)
    assert rc == 1 and result["failed"] == 3
    assert "no request succeeded" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["grpc", "openai"])
def test_unreachable_url(capsys, backend: str) -> None:
    port = free_port()
    url = f"127.0.0.1:{port}" if backend == "grpc" else f"http://127.0.0.1:{port}"
    assert main(["loadgen", "--backend", backend, "--url", url, *TINY]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the" in err and str(port) in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "says"), [
    (["--request-rate", "0"], "--request-rate: must be > 0"),
    (["--request-rate", "-2"], "--request-rate: must be > 0"),
    (["--request-rate", "abc"], "--request-rate: expected a positive number"),
    (["--burstiness", "0"], "--burstiness: must be a finite number > 0"),
    (["--burstiness", "-1"], "--burstiness: must be a finite number > 0"),
    (["--max-concurrency", "0"], "--max-concurrency: must be >= 1"),
    (["--num-requests", "x"], "--num-requests: expected an integer"),
    (["--duration", "0"], "--duration: must be > 0"),
    (["--metric-percentiles", "50,200"], "--metric-percentiles: percentiles must be"),
    (["--backend", "http"], "invalid choice"),
])
def test_invalid_options_are_usage_errors(capsys, args: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["loadgen", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "says"), [
    (["--goodput", "ttft"], "invalid --goodput 'ttft'"),
    (["--goodput", "ttft:100", "latency:5"], "invalid --goodput 'latency:5'"),
    (["--goodput", "tpot:fast"], "'fast' is not a number"),
    (["--workload", "rag", "--dataset", "/nonexistent/musique.json"], "/nonexistent/musique.json"),
    (["--workload", "mooncake", "--dataset", "/nonexistent/trace.jsonl"], "/nonexistent/trace.jsonl"),
    (["--backend", "grpc", "--url", "http://127.0.0.1:1"], "host:port"),
    (["--backend", "openai", "--url", "127.0.0.1:1"], "http(s) URL"),
    (["--workload", "multimodal", "--image-size", "64"], "--image-size must be WxH or WxH:WxH"),
    (["--workload", "multimodal", "--num-images", "1", "--images-per-request", "2"],
     "--images-per-request 2 is more than --num-images 1"),
    (["--workload", "multimodal", "--text-share", "2"], "--text-share must be in [0, 1], got 2.0"),
])
def test_invalid_settings_exit_2_with_a_message(capsys, args: list[str], says: str) -> None:
    assert main(["loadgen", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err


def test_malformed_trace_exits_2(tmp_path, capsys) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n{oops\n')
    assert main(["loadgen", "--workload", "mooncake", "--dataset", str(trace)]) == 2
    err = capsys.readouterr().err
    assert f"{trace}, line 2" in err and "Traceback" not in err


def test_sigterm_stops_a_run_cleanly(fake_openai, tmp_path) -> None:
    server, url = fake_openai(["ok"])
    out = tmp_path / "terminated.json"
    args = ["--backend", "openai", "--url", url, "--request-rate", "20", "--num-requests", "100000",
            "--json", str(out), *TINY]
    rc, stdout, stderr, _ = interrupt_loadgen(args, lambda: len(server.requests) >= 3, signal.SIGTERM)
    assert rc == 143, stderr
    assert "Traceback" not in stderr and "interrupted by SIGTERM" in stdout
    result = json.loads(out.read_text())
    assert result["completed"] >= 2 and result["interrupted"] == "SIGTERM"
