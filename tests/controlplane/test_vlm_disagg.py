"""A vision-language request prefilled on a prefill worker and decoded on a decode worker (the
images travel with the request to both): the output equals one engine's, and every block comes back."""
from __future__ import annotations

from controlplane.router_types import GenerateInput
from kvweave.sampling_params import SamplingParams
from tests.controlplane.test_disagg_serving import ENGINE, ROUTER, _idle_blocks_back
from tests.inprocess_cluster import InProcessCluster
from tests.vlm_models import image_part, make_png


def test_image_request_prefilled_remotely(redis_server, tiny_vlm_model, tiny_engine_factory):
    c = InProcessCluster(redis_server.url, tiny_vlm_model, 0, **ENGINE).start()
    try:
        c.add_worker("p0", role="prefill")
        c.add_worker("d0", role="decode")
        c.add_router("chunk_aware", router_config=ROUTER)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        messages = [{"role": "user", "content": [{"type": "text", "text": "Describe "},
                                                 image_part(make_png(40, 24, seed=21)),
                                                 {"type": "text", "text": " please"}]}]
        want = tiny_engine_factory(tiny_vlm_model, **ENGINE).generate([{"messages": messages}], params)[0]

        async def run():
            return [d async for d in c.routers[0].router.generate(GenerateInput(messages=messages, params=params))]
        deltas = c.run(run())
        assert [t for d in deltas for t in d.token_ids] == want.token_ids
        last = deltas[-1]
        assert last.usage.disaggregation == "remote" and last.usage.prefill_worker_id == "p0"
        assert last.worker_id == "d0"
        _idle_blocks_back(c)
    finally:
        c.stop()
