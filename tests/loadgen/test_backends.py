"""What the backends read from a finished request's usage: the SDK's `Usage` (gRPC) and an OpenAI
usage object with kvweave's block (HTTP), prefill/decode disaggregation included."""
from __future__ import annotations

import pytest

from kvweave.client_types import Usage
from loadgen.backends import apply_usage, apply_usage_json
from loadgen.records import RequestRecord


def test_grpc_usage() -> None:
    record = RequestRecord(prompt_tokens=3, output_tokens=2, worker_id="d1")
    apply_usage(record, Usage(prompt_tokens=40, completion_tokens=8, cached_tokens=16, chunk_reused_tokens=4,
                              recomputed_tokens=1, disaggregation="remote", prefill_worker_id="p0"))
    assert (record.prompt_tokens, record.output_tokens, record.cached_tokens, record.chunk_reused_tokens,
            record.recomputed_tokens) == (40, 8, 16, 4, 1)
    assert (record.disaggregation, record.prefill_worker_id, record.worker_id) == ("remote", "p0", "d1")
    apply_usage(record, Usage(prompt_tokens=40, completion_tokens=8, disaggregation="short"))
    assert (record.disaggregation, record.prefill_worker_id) == ("short", "")


def test_http_usage() -> None:
    record = RequestRecord(prompt_tokens=3, output_tokens=2)
    apply_usage_json(record, {"prompt_tokens": 40, "completion_tokens": 8,
                              "prompt_tokens_details": {"cached_tokens": 16},
                              "kvweave": {"chunk_reused_tokens": 4, "recomputed_tokens": 1, "worker_id": "d1",
                                          "disaggregation": "remote", "prefill_worker_id": "p0"}})
    assert (record.prompt_tokens, record.output_tokens, record.cached_tokens, record.chunk_reused_tokens,
            record.recomputed_tokens) == (40, 8, 16, 4, 1)
    assert (record.disaggregation, record.prefill_worker_id, record.worker_id) == ("remote", "p0", "d1")
    plain = RequestRecord(prompt_tokens=3, output_tokens=2)  # a server without kvweave's block (vLLM, SGLang)
    apply_usage_json(plain, {"prompt_tokens": 5})
    assert (plain.prompt_tokens, plain.output_tokens, plain.disaggregation, plain.prefill_worker_id,
            plain.worker_id) == (5, 2, "", "", None)


@pytest.mark.asyncio
async def test_openai_backend_adds_extra_body_to_every_request() -> None:
    """A real HTTP server (aiohttp, loopback) records what the backend posts."""
    from aiohttp import web

    from controlplane.procs import free_port
    from loadgen.backends import OpenAIBackend
    from loadgen.types import Turn

    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"text": "hi", "finish_reason": "length"}]}\n\ndata: [DONE]\n\n')
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", extra_body={"logit_bias": {"2": -100.0}})
        assert await backend.connect() == "m"
        record = await backend.send(Turn(max_tokens=3, prompt="Hello"))
        await backend.send(Turn(max_tokens=3, token_ids=(5, 6)))
        await backend.close()
    finally:
        await runner.cleanup()
    assert record.ok and record.text == "hi"
    assert [b["logit_bias"] for b in bodies] == [{"2": -100.0}] * 2
    assert (bodies[0]["prompt"], bodies[1]["prompt"], bodies[0]["ignore_eos"]) == ("Hello", [5, 6], True)
