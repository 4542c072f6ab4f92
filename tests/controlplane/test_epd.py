"""Encode, prefill and decode on separate workers: the encode worker makes each image's embeddings,
the prefill worker fetches them through the KV transfer path (the embedding cache is the cluster's,
found through the KV index), and the output equals one engine's. Images one pixel apart never share
embeddings; without an encode worker the request's own worker encodes. The router names each
image's holder in the request, so a worker fetches from it before it lists the encode worker as a
peer, and with peer fetches off; an encode call that fails leaves the images to the worker."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis.asyncio as aioredis

from controlplane.openai_api import usage_json
from controlplane.router_types import GenerateInput
from kvweave.registry import Registry, WorkerInfo, WorkerLoad
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


def test_the_router_names_each_images_holder(epd, monkeypatch):
    """The serving workers' peer lists lack the encode worker (as until their first heartbeat after
    it joined): they fetch each embedding from the holder the router names, the encode worker that
    just made it or the worker the index lists, and encode nothing."""
    e0, p0, d0 = epd.workers
    for worker in (p0, d0):
        monkeypatch.setattr(worker.prefetcher.embeddings, "peers", lambda: {})
    encoded = {w.worker_id: _worker_images(w, "encoded") for w in epd.workers}
    made, held = _router_images(epd, "encoded"), _router_images(epd, "held")
    usage = _generate(epd, _messages(make_png(40, 24, seed=36)))[-1].usage
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 1, 0)
    assert _router_images(epd, "encoded") == made + 1
    png = make_png(40, 24, seed=37)  # held by e0 before any request names it: no Encode call for it
    with grpc.insecure_channel(e0.address) as channel:
        answer = worker_pb2_grpc.WorkerStub(channel).Encode(worker_pb2.EncodeRequest(images=[png]), timeout=30)
    assert list(answer.sources) == ["encoded"]
    usage = _generate(epd, _messages(png))[-1].usage
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 1, 0)
    assert _router_images(epd, "held") == held + 1 and _router_images(epd, "encoded") == made + 1
    assert {w.worker_id: _worker_images(w, "encoded") for w in epd.workers} == {**encoded, "e0": encoded["e0"] + 2}


def test_a_worker_without_peer_fetch_fetches_what_the_router_names(redis_server, tiny_vlm_model):
    """`--peer-fetch false`: the worker looks up no peer itself, yet takes the encode worker's
    embedding the router names (else every Encode call for it would be wasted)."""
    c = InProcessCluster(redis_server.url, tiny_vlm_model, 0, **ENGINE).start()
    try:
        e0 = c.add_worker("e0", role="encode", **HOST_TIER)
        w0 = c.add_worker("w0", peer_fetch=False)
        c.add_router("chunk_aware")
        assert w0.prefetcher.index is None and w0.prefetcher.peers is None
        usage = _generate(c, _messages(make_png(40, 24, seed=38)))[-1].usage
        assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 1, 0)
        assert _router_images(c, "encoded") == 1 and _worker_images(e0, "encoded") == 1
        assert _worker_images(w0, "encoded") == 0
    finally:
        c.stop()


def test_an_encode_worker_reports_the_images_it_is_encoding(epd, monkeypatch):
    """While an Encode call of 2 images is in flight, the encode worker's GetLoad and its heartbeat's
    entry say 2 images waiting; 0 once it has answered."""
    e0 = epd.workers[0]
    stager = e0.prefetcher.embeddings
    embed, gate = stager.embed, epd.run(_make_event())

    async def held_embed(*args, **kwargs):
        await gate.wait()
        return await embed(*args, **kwargs)

    monkeypatch.setattr(stager, "embed", held_embed)

    def waiting() -> tuple[int, int]:
        with grpc.insecure_channel(e0.address) as channel:
            answer = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=30)
        return answer.load.num_waiting, e0._info().load.num_waiting

    pngs = [make_png(24, 24, seed=s) for s in (42, 43)]
    with grpc.insecure_channel(e0.address) as channel, ThreadPoolExecutor(1) as pool:
        call = pool.submit(worker_pb2_grpc.WorkerStub(channel).Encode, worker_pb2.EncodeRequest(images=pngs),
                           timeout=60)
        try:
            deadline = time.monotonic() + 30
            while waiting() != (2, 2):
                assert time.monotonic() < deadline, f"the encode worker reports {waiting()} images waiting, not 2"
                time.sleep(0.05)
        finally:
            epd.loop.call_soon_threadsafe(gate.set)
        assert list(call.result(timeout=60).sources) == ["encoded", "encoded"]
    assert waiting() == (0, 0)


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


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


@pytest.fixture(scope="module")
def colocated(redis_server, tiny_vlm_model):
    """One colocated worker w0 (no host tier), a router, no encode worker."""
    c = InProcessCluster(redis_server.url, tiny_vlm_model, 1, **ENGINE).start()
    c.add_router("chunk_aware")
    yield c
    c.stop()


def test_without_encode_worker_the_worker_encodes(colocated):
    c = colocated
    local, made = _router_images(c, "local"), _router_images(c, "encoded")
    png = make_png(40, 24, seed=34)
    usage = _generate(c, _messages(png))[-1].usage
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 0, 1)
    assert _router_images(c, "local") == local + 1 and _router_images(c, "encoded") == made
    usage = _generate(c, _messages(png))[-1].usage  # its in-memory cache (no host tier here)
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (1, 0, 0)
    # Another tenant's request for the same image: tenants share no cache, the in-memory one included.
    async def other_tenant():
        inp = GenerateInput(messages=_messages(png), params=PARAMS, tenant="other")
        return [d async for d in c.routers[0].router.generate(inp)]
    usage = c.run(other_tenant())[-1].usage
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 0, 1)


class _FailingEncoder(worker_pb2_grpc.WorkerServicer):
    """An encode worker that fails every Encode call as one going away does (UNAVAILABLE)."""

    def __init__(self) -> None:
        self.num_calls = 0

    async def Encode(self, request, context):
        self.num_calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the encode worker is going away")


def _encoders(c: InProcessCluster) -> list[str]:
    return [w.worker_id for w in c.routers[0].router.pool.eligible(roles=("encode",))]


def _wait_for_encoders(c: InProcessCluster, want: list[str]) -> None:
    deadline = time.monotonic() + 30
    while _encoders(c) != want:
        assert time.monotonic() < deadline, f"the router lists encode workers {_encoders(c)}, not {want}"
        time.sleep(0.05)


@contextlib.contextmanager
def failing_encoders(c: InProcessCluster, images_in_flight: dict[str, int]):
    """A `_FailingEncoder` per worker id, registered as an encode worker of the cluster's model that
    reports that many images in flight; yields them by id, deregistered at the end."""
    model = c.workers[0].engine.engine.model_name
    encoders = {worker_id: _FailingEncoder() for worker_id in images_in_flight}

    async def start() -> tuple[list[grpc.aio.Server], aioredis.Redis]:
        servers, client = [], aioredis.Redis.from_url(c.redis_url)
        for worker_id, encoder in encoders.items():
            servers.append(grpc.aio.server())
            worker_pb2_grpc.add_WorkerServicer_to_server(encoder, servers[-1])
            port = servers[-1].add_insecure_port("127.0.0.1:0")
            await servers[-1].start()
            load = WorkerLoad(num_waiting=images_in_flight[worker_id])
            await Registry(client, lease_s=60).heartbeat(WorkerInfo(worker_id, f"127.0.0.1:{port}", model,
                                                                    role="encode", load=load))
        return servers, client

    async def stop() -> None:
        for worker_id in encoders:
            await Registry(client).deregister(worker_id)
        await client.aclose()
        for server in servers:
            await server.stop(None)

    servers, client = c.run(start())
    try:
        _wait_for_encoders(c, sorted(encoders))
        yield encoders
    finally:
        c.run(stop())
        _wait_for_encoders(c, [])


def test_a_failed_encode_call_leaves_the_images_to_the_worker(colocated):
    """A registered encode worker answers Encode with UNAVAILABLE: the request still succeeds, its
    worker encodes the image, and the router counts it `local` (not `encoded`)."""
    c = colocated
    with failing_encoders(c, {"e-failing": 0}) as encoders:
        local, made = _router_images(c, "local"), _router_images(c, "encoded")
        deltas = _generate(c, _messages(make_png(40, 24, seed=39)))
        usage = deltas[-1].usage
        assert deltas[-1].finish_reason == "length" and sum(len(d.token_ids) for d in deltas) == PARAMS.max_tokens
        assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 0, 1)
        assert encoders["e-failing"].num_calls == 1
        assert _router_images(c, "local") == local + 1 and _router_images(c, "encoded") == made


def test_the_router_sends_images_to_the_encoder_with_the_fewest_in_flight(colocated):
    """Two encode workers, one reporting 5 images in flight (other routers' calls): both requests'
    images go to the other (with equal loads the router alternates). Their calls fail, so each
    image is encoded by the serving worker."""
    with failing_encoders(colocated, {"e-busy": 5, "e-idle": 0}) as encoders:
        for seed in (40, 41):
            assert _generate(colocated, _messages(make_png(40, 24, seed=seed)))[-1].usage.images_encoded == 1
        assert (encoders["e-busy"].num_calls, encoders["e-idle"].num_calls) == (0, 2)


@pytest.fixture(scope="module")
def pair(redis_server, tiny_vlm_model):
    """Colocated workers w0 and w1, both with a host tier, a router, no encode worker."""
    c = InProcessCluster(redis_server.url, tiny_vlm_model, 0, **ENGINE).start()
    c.add_worker("w0", **HOST_TIER), c.add_worker("w1", **HOST_TIER)
    c.add_router("chunk_aware")
    yield c
    c.stop()


def _send(c: InProcessCluster, worker, png: bytes, text: str,
          holders: tuple[worker_pb2.EmbeddingHolder, ...] = ()) -> worker_pb2.WorkerGenerateResponse:
    """Straight to `worker`, with the router's token ids (and `holders` as the router would name them)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": text}, image_part(png)]}]
    ids, _, images = c.routers[0].router.encode_prompt_images(GenerateInput(messages=messages))
    request = worker_pb2.WorkerGenerateRequest(prompt_token_ids=ids, images=[img.data for img in images],
                                               sampling=common_pb2.SamplingParams(max_tokens=2),
                                               embedding_holders=holders)
    with grpc.insecure_channel(worker.address) as channel:
        return list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=60))[-1]


def _encode_and_publish(c: InProcessCluster, worker, png: bytes) -> None:
    assert _send(c, worker, png, "First ").usage.images_encoded == 1
    c.run(worker.engine.flush_kv_events())  # its KV events in the index now (they go within ~0.6 s anyway)
    c.run(worker.service.publish())


def test_an_embedding_encoded_on_one_worker_is_fetched_by_another(pair):
    """No encode worker: the embedding a colocated worker encoded (and published) is the cluster's."""
    w0, w1 = pair.workers
    png = make_png(40, 24, seed=35)
    _encode_and_publish(pair, w0, png)
    usage = _send(pair, w1, png, "Another text before the image ").usage
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 1, 0)
    assert _worker_images(w1, "encoded") == 0


def test_a_named_holder_that_cannot_be_reached_leaves_the_usual_path(pair):
    """The holder named for an image refuses the connection: the worker tries it, then finds the
    embedding in the index on a peer, as without a name."""
    w0, w1 = pair.workers
    png = make_png(40, 24, seed=40)
    _encode_and_publish(pair, w0, png)
    failures = w1.metrics.registry.get_sample_value("kvweave_worker_kv_transfer_failures_total")
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        gone = worker_pb2.EmbeddingHolder(worker_id="gone", address=f"127.0.0.1:{closed.getsockname()[1]}")
        usage = _send(pair, w1, png, "Another text before the image ", (gone,)).usage
    assert (usage.images_cached, usage.images_fetched, usage.images_encoded) == (0, 1, 0)
    assert w1.metrics.registry.get_sample_value("kvweave_worker_kv_transfer_failures_total") == failures + 1


@pytest.mark.parametrize("holders, error", [
    ((worker_pb2.EmbeddingHolder(worker_id="w0", address="127.0.0.1:1"),) * 2, "2 embedding holders for 1 image(s)"),
    ((worker_pb2.EmbeddingHolder(worker_id="w0", address="127.0.0.1:1\nforged"),), "embedding_holders.address"),
])
def test_bad_embedding_holders_are_invalid_argument(pair, holders, error):
    with pytest.raises(grpc.RpcError) as err:
        _send(pair, pair.workers[1], make_png(24, 24, seed=41), "Look ", holders)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error in err.value.details()
