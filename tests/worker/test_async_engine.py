"""The asyncio engine front: concurrent streams, cancellation, bad input, failures in a step."""
import asyncio

import pytest

from worker.async_engine import AsyncEngine
from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], list(range(100, 140))]


@pytest.fixture
def engines(tiny_engine_factory):
    sync_engine = tiny_engine_factory()
    expected = [o.token_ids for o in sync_engine.generate(PROMPTS, GREEDY)]
    async_engine = AsyncEngine(tiny_engine_factory())
    yield async_engine, expected
    async_engine.shutdown()


async def _collect(engine: AsyncEngine, prompt, params=GREEDY, req_id=None):
    deltas, last = [], None
    async for out in engine.generate(prompt, params, req_id=req_id):
        deltas.extend(out.new_token_ids)
        last = out
    return deltas, last


def test_concurrent_streams_match_the_sync_engine(engines):
    engine, expected = engines

    async def main():
        return await asyncio.gather(*(_collect(engine, p) for p in PROMPTS))

    results = asyncio.run(main())
    for (deltas, last), exp in zip(results, expected):
        assert deltas == exp
        assert last.token_ids == exp and last.finished and last.finish_reason == "length"


def test_bad_input_fails_at_once_and_others_still_run(engines):
    engine, expected = engines

    async def main():
        good = asyncio.create_task(_collect(engine, PROMPTS[0]))
        with pytest.raises(InvalidRequestError, match="empty"):
            await _collect(engine, [])
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            await _collect(engine, PROMPTS[1], SamplingParams(max_tokens=0))
        return await good

    deltas, _ = asyncio.run(main())
    assert deltas == expected[0]


def test_a_cancelled_stream_aborts_its_request(engines):
    engine, expected = engines
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        agen = engine.generate(PROMPTS[2], long, req_id="cancel-me")
        first = await agen.__anext__()
        await agen.aclose()  # the client went away
        for _ in range(200):
            if not engine.engine.scheduler.requests and engine.num_requests == 0:
                break
            await asyncio.sleep(0.01)
        return first, await _collect(engine, PROMPTS[0])

    first, (deltas, _) = asyncio.run(main())
    assert len(first.new_token_ids) == 1
    assert "cancel-me" not in engine.engine.scheduler.requests
    assert engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_blocks
    assert deltas == expected[0]


def test_a_failing_step_fails_requests_in_flight_and_the_loop_goes_on(engines, monkeypatch):
    engine, expected = engines
    real_execute = engine.engine.runner.execute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(engine.engine.runner, "execute", flaky)

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await _collect(engine, PROMPTS[1])
        return await _collect(engine, PROMPTS[0])

    deltas, _ = asyncio.run(main())
    assert deltas == expected[0]
