"""The worker's admission bound (`WorkerOptions.max_waiting`), over real loopback gRPC: requests held
before they enter the engine (a prefetch hook that waits, standing in for a long queue) fill the
bound; the next one is refused with RESOURCE_EXHAUSTED at once and counted; once the held ones
stream, new requests are admitted again."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from kvweave.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.server import WorkerOptions, WorkerServer

SAMPLING = common_pb2.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _request(k: int) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(request_id=f"r{k}", prompt_token_ids=[3 + k, 5, 7, 9], sampling=SAMPLING)


def test_worker_refuses_beyond_max_waiting(tiny_model_variant, tiny_engine_factory):
    engine = tiny_engine_factory(tiny_model_variant("gqa"))

    async def main() -> None:
        server = WorkerServer(engine.config, WorkerOptions(worker_id="w-adm", max_waiting=2, metrics_port=-1),
                              engine=engine)
        await server.start()
        gate = asyncio.Event()

        async def held(req):
            await gate.wait()
            return None

        server.engine.prefetch = held
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                waiting = [asyncio.ensure_future(_collect(stub, _request(k))) for k in range(2)]
                for _ in range(500):
                    if server.engine.num_requests == 2:
                        break
                    await asyncio.sleep(0.01)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _collect(stub, _request(2))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limit 2" in refused.value.details()
                gate.set()
                assert [len(await w) > 0 for w in waiting] == [True, True]
                assert len(await _collect(stub, _request(3))) > 0  # the queue drained: admitted again
                overloaded = server.metrics.requests.labels("overloaded")._value.get()
                assert overloaded == 1
        finally:
            await server.stop()

    asyncio.run(main())


async def _collect(stub, request) -> list[worker_pb2.WorkerGenerateResponse]:
    return [msg async for msg in stub.Generate(request)]
