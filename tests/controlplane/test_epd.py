"""Encode, prefill and decode on separate workers: the encode worker makes each image's embeddings,
the prefill worker fetches them through the KV transfer path (the embedding cache is the cluster's,
found through the KV index), and the output equals one engine's. Images one pixel apart never share
embeddings; without an encode worker the request's own worker encodes."""
from __future__ import annotations

import grpc
import pytest

from controlplane.openai_api import usage_json
from controlplane.router_types import GenerateInput
from kvweave.sampling_params import SamplingParams
from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.controlplane.test_disagg_serving import ENGINE, ROUTER
from tests.inprocess_cluster import InProcessCluster
from tests.vlm_models import image_part, make_png

HOST_TIER = {"dram_cache_gb": 0.01}
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _messages(png: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look at "}, image_part(png),
                                         {"type": "text", "text": " and say what it shows"}]}]


def _generate(c: InProcessCluster, messages: list[dict]):
    async def run():
        return [d async for d in c.routers[0].router.generate(GenerateInput(messages=messages, params=PARAMS))]
    return c.run(run())


def _worker_images(server, source: str) -> float:
    return server.metrics.registry.get_sample_value("kvweave_worker_image_embeddings_total", {"source": source})


def _router_images(c: InProcessCluster, placement: str) -> float:
    return c.routers[0].router.metrics.registry.get_sample_value("kvweave_router_image_embeddings_total",
                                                                 {"placement": placement})


@pytest.fixture(scope="module")
def epd(redis_server, tiny_vlm_model):
    """Encode worker e0, prefill worker p0 (both with a host tier), decode worker d0, a router."""
    c = InProcessCluster(redis_server.url, tiny_vlm_model, 0, **ENGINE).start()
    c.add_worker("e0", role="encode", **HOST_TIER)
    c.add_worker("p0", role="prefill", **HOST_TIER)
    c.add_worker("d0", role="decode")
    c.add_router("chunk_aware", router_config=ROUTER)
    yield c
    c.stop()


def test_epd_output_equals_one_engine(epd, tiny_vlm_model, tiny_engine_factory):
    e0, p0, _ = epd.workers
    messages = _messages(make_png(40, 24, seed=31))
    want = tiny_engine_factory(tiny_vlm_model, **ENGINE).generate([{"messages": messages}], PARAMS)[0]
    deltas = _generate(epd, messages)
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    usage = deltas[-1].usage
    assert usage.disaggregation == "remote" and usage.prefill_worker_id == "p0" and deltas[-1].worker_id == "d0"
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 1, 0)
    assert usage_json(usage)["kvweave"]["images"] == {"cached": 0, "fetched": 1, "encoded": 0}
    assert _worker_images(e0, "encoded") >= 1 and _worker_images(p0, "encoded") == 0


def test_images_one_pixel_apart_never_share_embeddings(epd):
    e0, p0, _ = epd.workers
    pngs = [make_png(40, 24, seed=32)] + [make_png(40, 24, seed=32, poke=(x, 5)) for x in (3, 17)]
    encoded, held = _worker_images(e0, "encoded"), _router_images(epd, "held")
    for png in pngs:
        usage = _generate(epd, _messages(png))[-1].usage
        assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 1, 0)
    # every image was new to the cluster: the encode worker encoded each, the router found none held
    assert _worker_images(e0, "encoded") - encoded == len(pngs)
    assert _router_images(epd, "held") == held
    # the same image again: held in the cluster (p0 kept what it fetched), never encoded on p0
    usage = _generate(epd, _messages(pngs[1]))[-1].usage
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (1, 0, 0)
    assert _router_images(epd, "held") == held + 1
    assert _worker_images(e0, "encoded") - encoded == len(pngs) and _worker_images(p0, "encoded") == 0


def test_encode_worker_refuses_generate_and_bad_images(epd):
    e0 = epd.workers[0]
    with grpc.insecure_channel(e0.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(worker_pb2.WorkerGenerateRequest(prompt_token_ids=[5, 6, 7]), timeout=30))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "encode worker" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Encode(worker_pb2.EncodeRequest(images=[b"GIF89a not really"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 0" in err.value.details()
        png = make_png(24, 24, seed=33)
        assert list(stub.Encode(worker_pb2.EncodeRequest(images=[png]), timeout=30).sources) == ["encoded"]
        assert list(stub.Encode(worker_pb2.EncodeRequest(images=[png]), timeout=30).sources) == ["cached"]


def test_without_encode_worker_the_worker_encodes(redis_server, tiny_vlm_model):
    c = InProcessCluster(redis_server.url, tiny_vlm_model, 1, **ENGINE).start()
    try:
        c.add_router("chunk_aware")
        png = make_png(40, 24, seed=34)
        usage = _generate(c, _messages(png))[-1].usage
        assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 0, 1)
        assert _router_images(c, "local") == 1 and _router_images(c, "encoded") == 0
        usage = _generate(c, _messages(png))[-1].usage  # its in-memory cache (no host tier here)
        assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (1, 0, 0)
        # Another tenant's request for the same image: tenants share no cache, the in-memory one included.
        async def other_tenant():
            inp = GenerateInput(messages=_messages(png), params=PARAMS, tenant="other")
            return [d async for d in c.routers[0].router.generate(inp)]
        usage = c.run(other_tenant())[-1].usage
        assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 0, 1)
    finally:
        c.stop()


def test_an_embedding_encoded_on_one_worker_is_fetched_by_another(redis_server, tiny_vlm_model):
    """No encode worker: the embedding a colocated worker encoded (and published) is the cluster's."""
    c = InProcessCluster(redis_server.url, tiny_vlm_model, 0, **ENGINE).start()
    try:
        w0, w1 = c.add_worker("w0", **HOST_TIER), c.add_worker("w1", **HOST_TIER)
        c.add_router("chunk_aware")
        png = make_png(40, 24, seed=35)

        def send(worker, text: str) -> worker_pb2.WorkerGenerateResponse:
            messages = [{"role": "user", "content": [{"type": "text", "text": text}, image_part(png)]}]
            ids, _, images = c.routers[0].router.encode_prompt_images(GenerateInput(messages=messages))
            request = worker_pb2.WorkerGenerateRequest(prompt_token_ids=ids, images=[img.data for img in images],
                                                       sampling=common_pb2.SamplingParams(max_tokens=2))
            with grpc.insecure_channel(worker.address) as channel:
                return list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=60))[-1]

        assert send(w0, "First ").usage.images_encoded == 1
        c.run(w0.engine.flush_kv_events())  # its KV events in the index now (they go within ~0.6 s anyway)
        c.run(w0.service.publish())
        usage = send(w1, "Another text before the image ").usage
        assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 1, 0)
        assert _worker_images(w1, "encoded") == 0
    finally:
        c.stop()
