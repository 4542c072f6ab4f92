"""Route explanations end to end (real Redis, real gRPC workers on a tiny model, a real router): the
usage of every response says what the router predicted and what the worker delivered (HTTP and
gRPC), the router counts the two per worker and flags divergence (a stale index, missing KV
events), and `POST /v1/route/explain` / `kvweave route explain` show a decision without sending it."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import redis

import kvweave

from cli.main import main as kvweave_main
from kvstore.index import index_key
from kvstore.keys import encode_extra_keys, hash_blocks
from kvweave.v1 import common_pb2, inference_pb2
from tests.controlplane.test_auth import http, write_keys
from tests.controlplane.test_router import MODEL, generate, prompt_ids, stub_for, token_prompt, wait_indexed
from tests.controlplane.test_router_metrics import scrape


def completion(router, prompt, **fields) -> dict:
    status, body, _ = http(f"{router.http_url}/v1/completions", "POST",
                           {"prompt": prompt, "max_tokens": 2, "temperature": 0.0, **fields})
    assert status == 200, body
    return body


def route_samples(router) -> dict[str, dict]:
    """The route-check counters by worker: {worker: {"checked", "predicted", "delivered", "under", "over"}}."""
    _, samples = scrape(f"{router.http_url}/metrics")
    out: dict[str, dict] = {}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if name.startswith("kvweave_router_route_") and name.endswith("_total"):
            kind = name.removeprefix("kvweave_router_route_").removesuffix("_total").split("_")[0]
            key = labels.get("direction", kind)
            out.setdefault(labels["worker"], {})[key] = value
    return out


def test_usage_says_what_was_predicted_and_delivered(cluster):
    router = cluster.add_router("chunk_aware", traffic_weight=0.0)  # the holder's cache alone decides
    stub = stub_for(router)
    prefix = prompt_ids(31, 160)  # 10 full blocks
    _, _, first = generate(stub, token_prompt(prefix + [7, 8, 9], max_tokens=2))
    holder = first.worker_id
    other = ({"w0", "w1"} - {holder}).pop()
    route = first.usage.route
    assert route.worker_id == holder and route.policy == "chunk_aware" and route.reason == "cost"
    assert route.prefix_tokens == common_pb2.TierTokens()  # nothing cached anywhere yet
    assert route.HasField("cost") and route.runner_up_worker_id == other and route.divergence == ""
    wait_indexed(cluster, router, prefix, holder)

    body = completion(router, prefix + prompt_ids(32, 20))
    kv = body["usage"]["kvweave"]
    assert kv["worker_id"] == holder
    r = kv["route"]
    assert (r["worker_id"], r["policy"], r["reason"]) == (holder, "chunk_aware", "cost")
    assert r["prefix_tokens"] == {"device": 160} and r["chunk_tokens"] == {}
    assert r["delivered"] == {"prefix_tokens": 160, "chunk_tokens": 0} and r["divergence"] == ""
    assert r["runner_up"]["worker_id"] == other and r["runner_up"]["cost"] > r["cost"]

    _, _, last = generate(stub, token_prompt(prefix + prompt_ids(33, 20), max_tokens=2))
    route = last.usage.route
    assert last.worker_id == holder and last.usage.cached_tokens == 160
    assert (route.prefix_tokens.device, route.prefix_tokens.peer) == (160, 0)
    assert route.runner_up_worker_id == other and route.runner_up_cost > route.cost
    assert route.divergence == ""

    with kvweave.Client(router.grpc_address, timeout=60) as client:  # the SDK's view of the same
        reply = client.complete(token_ids=prefix + prompt_ids(34, 20), max_tokens=1, temperature=0.0)
    assert reply.worker_id == holder and reply.usage.cached_tokens == 160
    assert reply.usage.route == kvweave.RouteInfo(holder, "chunk_aware", "cost", {"device": 160}, {},
                                                  reply.usage.route.cost, other, reply.usage.route.runner_up_cost, "")
    assert reply.usage.route.runner_up_cost > reply.usage.route.cost

    counts = route_samples(router)
    assert counts[holder] == {"checked": 4, "predicted": 480, "delivered": 480, "under": 0, "over": 0}


def test_divergence_is_flagged_per_worker(make_cluster):
    """One worker: its KV events lost (the index forgot what it holds) -> "over"; the index naming
    blocks it never held (stale entries) -> "under". Both counted, neither failing the request."""
    c = make_cluster(num_workers=1)
    router = c.add_router("chunk_aware")
    stub = stub_for(router)
    prefix = prompt_ids(41, 160)
    assert generate(stub, token_prompt(prefix + [5], max_tokens=1))[2].usage.route.divergence == ""
    wait_indexed(c, router, prefix, "w0")
    client = redis.Redis.from_url(c.redis_url)
    client.delete(index_key("w0", "device"))  # the worker's events never reached the index

    _, _, last = generate(stub, token_prompt(prefix + [6], max_tokens=1))
    assert last.usage.cached_tokens == 160 and last.usage.route.prefix_tokens.device == 0
    assert last.usage.route.divergence == "over"

    stale = prompt_ids(42, 160)  # never served: the index claims w0 holds it
    hashes = hash_blocks(stale, 16, encode_extra_keys((MODEL, "")))
    client.hset(index_key("w0", "device"), mapping={h: b"1:0" for h in hashes})
    body = completion(router, stale + [5])
    r = body["usage"]["kvweave"]["route"]
    assert r["prefix_tokens"] == {"device": 160} and r["delivered"]["prefix_tokens"] == 0
    assert r["divergence"] == "under"
    client.close()
    assert route_samples(router)["w0"] == {"checked": 3, "predicted": 160, "delivered": 160, "under": 1, "over": 1}


def test_route_explain_shows_the_decision_without_sending(cluster, capsys):
    router = cluster.add_router("chunk_aware")
    stub = stub_for(router)
    prefix = prompt_ids(51, 160)
    holder = generate(stub, token_prompt(prefix + [7], max_tokens=1))[2].worker_id
    other = ({"w0", "w1"} - {holder}).pop()
    wait_indexed(cluster, router, prefix, holder)
    before = cluster.num_worker_requests(), route_samples(router)

    status, body, _ = http(f"{router.http_url}/v1/route/explain", "POST", {"prompt": prefix + [8, 9]})
    assert status == 200, body
    assert (body["num_prompt_tokens"], body["num_chunks"]) == (162, 0)
    assert body["chosen"]["worker_id"] == holder and body["chosen"]["runner_up"]["worker_id"] == other
    candidates = {c["worker_id"]: c for c in body["candidates"]}
    assert candidates[holder]["prefix_tokens"] == {"device": 160}
    assert candidates[other]["prefix_tokens"] == {"peer": 160}
    assert candidates[holder]["cost"] == body["chosen"]["cost"] < candidates[other]["cost"]
    assert {"num_running", "num_waiting", "num_queued_prefill_tokens", "kv_usage"} <= candidates[other].keys()
    assert (cluster.num_worker_requests(), route_samples(router)) == before  # nothing was sent

    # The same over gRPC, through the SDK (blocking and asyncio).
    with kvweave.Client(router.grpc_address, timeout=60) as client:
        got = client.explain(token_ids=prefix + [8, 9])
    assert (got.num_prompt_tokens, got.num_chunks) == (162, 0)
    assert (got.chosen.worker_id, got.chosen.policy, got.chosen.runner_up_worker_id) == (holder, "chunk_aware", other)
    by_worker = {c.route.worker_id: c for c in got.candidates}
    assert by_worker[holder].route.prefix_tokens == {"device": 160} and by_worker[other].route.prefix_tokens == {"peer": 160}
    assert by_worker[holder].route.cost == got.chosen.cost < by_worker[other].route.cost
    assert all(0.0 <= c.kv_usage <= 1.0 and c.num_running >= 0 for c in got.candidates)

    async def explain_async():
        async with kvweave.AsyncClient(router.grpc_address, timeout=60) as client:
            return await client.explain(messages=[{"role": "user", "content": "Hello there"}])

    assert asyncio.run(explain_async()).chosen.worker_id in ("w0", "w1")
    assert (cluster.num_worker_requests(), route_samples(router)) == before  # still nothing sent

    # Chat messages and reusable chunks, as the completion and chat bodies carry them.
    status, body, _ = http(f"{router.http_url}/v1/route/explain", "POST",
                           {"messages": [{"role": "user", "content": "Hello there"}]})
    assert status == 200 and body["chosen"]["worker_id"] in ("w0", "w1")
    status, body, _ = http(f"{router.http_url}/v1/route/explain", "POST",
                           {"prompt": " Why?", "kvweave": {"chunks": ["Context:", "The quick brown fox."]}})
    assert status == 200 and body["num_chunks"] == 2

    # The command line: a table with the chosen worker marked, or the JSON as it is.
    assert kvweave_main(["route", "explain", "--url", router.http_url, "--prompt", "The quick brown fox"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prompt: ") and "chosen: w" in out and "prefix d/dram/ssd/peer" in out
    assert sum(line.startswith("* ") for line in out.splitlines()) == 1
    messages = json.dumps([{"role": "user", "content": "Hello there"}])
    assert kvweave_main(["route", "explain", "--url", router.http_url, "--messages", messages, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"]["policy"] == "chunk_aware"


@pytest.mark.parametrize("body, status, message", [
    ({}, 400, "prompt"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "hi", "model": "nope"}, 400, "nope"),
    ({"messages": "hi"}, 400, "messages"),
])
def test_route_explain_rejects_bad_input(cluster, body, status, message):
    router = cluster.routers[0] if cluster.routers else cluster.add_router("chunk_aware")
    got, answer, _ = http(f"{router.http_url}/v1/route/explain", "POST", body)
    assert got == status and message in answer["error"]["message"], answer


def test_grpc_explain_rejects_bad_input(cluster):
    router = cluster.routers[0] if cluster.routers else cluster.add_router("chunk_aware")
    with pytest.raises(grpc.RpcError) as e:  # the raw stub: no SDK check in between
        stub_for(router).Explain(inference_pb2.GenerateRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no prompt" in e.value.details()
    with kvweave.Client(router.grpc_address, timeout=60) as client:
        with pytest.raises(kvweave.InvalidRequest, match="nope"):
            client.explain("hi", model="nope")
        with pytest.raises(kvweave.InvalidRequest, match="empty"):
            client.explain("")


def test_route_explain_command_errors(cluster, capsys, tmp_path):
    router = cluster.routers[0] if cluster.routers else cluster.add_router("chunk_aware")
    assert kvweave_main(["route", "explain", "--url", router.http_url, "--messages", "[not json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert kvweave_main(["route", "explain", "--url", router.http_url, "--messages", '[{"role": "user"}]']) == 1
    assert "the router answered 400" in capsys.readouterr().err
    assert kvweave_main(["route", "explain", "--url", "http://127.0.0.1:9", "--prompt", "hi"]) == 1
    assert "cannot reach the router" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # neither --prompt nor --messages
        kvweave_main(["route", "explain", "--url", router.http_url])
    assert e.value.code == 2


def test_route_explain_needs_an_api_key_like_every_call(cluster, tmp_path, capsys):
    path = write_keys(tmp_path / "keys.json", {"keys": [{"key": "sk-alpha", "tenant": "alpha"}]})
    router = cluster.add_router("chunk_aware", serve_options={"api_keys_file": path})
    status, body, headers = http(f"{router.http_url}/v1/route/explain", "POST", {"prompt": "hi"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = http(f"{router.http_url}/v1/route/explain", "POST", {"prompt": "hi"}, key="sk-alpha")
    assert status == 200 and body["chosen"]["worker_id"] in ("w0", "w1")
    assert kvweave_main(["route", "explain", "--url", router.http_url, "--prompt", "hi"]) == 1
    assert "401" in capsys.readouterr().err
    assert kvweave_main(["route", "explain", "--url", router.http_url, "--prompt", "hi", "--api-key", "sk-alpha"]) == 0
    with kvweave.Client(router.grpc_address, timeout=60) as client:
        with pytest.raises(kvweave.Unauthenticated):
            client.explain("hi")
    with kvweave.Client(router.grpc_address, timeout=60, api_key="sk-alpha") as client:
        assert client.explain("hi").chosen.worker_id in ("w0", "w1")
