"""Prefill/decode handoff between two engines (worker/kv_handoff.py), in process: a prefill-only
request holds its KV under the handle's keys, the decode engine continues from the handle's first
token with the blocks pulled by key (here: exported by the prefill engine and staged, which is what
the prefetcher does over the network), and the output equals one engine serving the request alone:
greedy and seeded, for every prompt length modulo the block size. Blocks come back when the decode
side releases them or the TTL passes; a bad handle is refused."""
from __future__ import annotations

import pytest
import torch

from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams
from worker.kv_connector_worker import StagedKV
from worker.kv_handoff import Handoff
from worker.request import RequestStatus

BS = 16


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 37 + salt * 11) % 240 + 5 for i in range(n)]


def _run(engine, req_id: str) -> list:
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.req_id == req_id]
    return outs


def _prefill(engine, prompt, params, req_id="p") -> Handoff:
    engine.submit(engine.make_request(prompt, params, req_id, prefill_only=True))
    (final,) = [o for o in _run(engine, req_id) if o.finished]
    assert final.finish_reason == "handoff" and final.handoff is not None
    return final.handoff


def _staged(prefill_engine, handoff: Handoff, first: int = 0) -> StagedKV:
    kv = prefill_engine.connector.export(list(handoff.block_keys[first:]))
    staged = StagedKV()
    for key, value in zip(handoff.block_keys[first:], kv if kv is not None else []):
        staged.blocks[key] = (value.clone(), "handoff")
    return staged


def _decode(engine, prompt, params, handoff: Handoff, staged: StagedKV, req_id="d"):
    h = Handoff(**{**{f: getattr(handoff, f) for f in handoff.__slots__}, "source_address": "p:1"})
    req = engine.make_request(prompt, params, req_id, handoff=h)
    for key, (_, source) in staged.blocks.items():
        req.kv.staged_blocks[key] = source
    engine.submit(req, staged)
    outs = _run(engine, req_id)
    return outs, outs[-1]


@pytest.fixture(scope="module")
def engines(tiny_hf_model):
    from worker.engine import EngineConfig, LLMEngine

    def make():
        return LLMEngine(EngineConfig(model=str(tiny_hf_model), dtype="float32", num_blocks=128, block_size=BS,
                                      num_threads=1, max_num_batched_tokens=64))
    return make(), make(), make()


@pytest.mark.parametrize("length", [BS * 3 + r for r in range(BS)])
def test_handoff_output_equals_colocated_for_every_remainder(engines, length):
    alone, prefill, decode = engines
    prompt = _prompt(length, length)
    # The tiny random model is so peaked that only a high temperature makes seeded draws differ.
    for i, params in enumerate((SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                                SamplingParams(temperature=50.0, top_k=400, seed=length, max_tokens=5,
                                               ignore_eos=True, logprobs=2))):
        want = alone.generate([prompt], params)[0]
        free_p, free_d = prefill.block_manager.num_free_blocks, decode.block_manager.num_free_blocks
        handoff = _prefill(prefill, prompt, params, f"p{length}-{i}")
        assert len(handoff.block_keys) == -(-length // BS) and handoff.num_tokens == length
        assert (handoff.sampler_state != b"") == (params.seed is not None)
        outs, final = _decode(decode, prompt, params, handoff, _staged(prefill, handoff), f"d{length}-{i}")
        assert final.token_ids == want.token_ids
        assert final.text == want.text
        assert [t for o in outs for t in o.new_token_ids] == want.token_ids  # the first token is streamed once
        assert final.num_cached_tokens == length  # nothing of the prompt computed on the decode side
        if params.logprobs:
            assert [lp[0] for lp in final.logprobs] == pytest.approx([lp[0] for lp in want.logprobs], abs=1e-4)
        assert prefill.release_handoff(handoff.handoff_id)
        assert not prefill.release_handoff(handoff.handoff_id)
        assert prefill.block_manager.num_free_blocks == free_p
        assert decode.block_manager.num_free_blocks == free_d


def test_missing_blocks_are_computed_on_the_decode_side(engines):
    alone, prefill, decode = engines
    prompt = _prompt(70, 3)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    want = alone.generate([prompt], params)[0]
    handoff = _prefill(prefill, prompt, params, "p-missing")
    staged = _staged(prefill, handoff)
    del staged.blocks[handoff.block_keys[2]]  # a block that never arrived: it and all after are computed
    _, final = _decode(decode, prompt, params, handoff, staged, "d-missing")
    assert final.token_ids == want.token_ids and final.num_cached_tokens == 2 * BS
    _, final = _decode(decode, prompt, params, handoff, StagedKV(), "d-none")  # P gone: all computed
    assert final.token_ids == want.token_ids
    prefill.release_handoff(handoff.handoff_id)


def test_first_token_that_ends_the_request_makes_no_handoff(engines):
    _, prefill, _ = engines
    prompt = _prompt(40, 5)
    free = prefill.block_manager.num_free_blocks
    for params in (SamplingParams(temperature=0.0, max_tokens=1), SamplingParams(temperature=0.0, max_tokens=5,
                                                                                 stop_token_ids=list(range(300)))):
        prefill.submit(prefill.make_request(prompt, params, f"p-end-{params.max_tokens}", prefill_only=True))
        (final,) = [o for o in _run(prefill, f"p-end-{params.max_tokens}") if o.finished]
        assert final.handoff is None and final.finish_reason in ("length", "stop") and len(final.token_ids) == 1
    assert len(prefill.handoffs) == 0 and prefill.block_manager.num_free_blocks == free


def test_unreleased_handoff_expires(engines):
    _, prefill, _ = engines
    free = prefill.block_manager.num_free_blocks
    clock = [0.0]
    prefill.handoffs.clock = lambda: clock[0]
    try:
        handoff = _prefill(prefill, _prompt(50, 9), SamplingParams(temperature=0.0, max_tokens=3), "p-ttl")
        assert prefill.block_manager.num_free_blocks == free - 4
        assert prefill.expire_handoffs() == 0
        assert prefill.connector.export([handoff.block_keys[0]]) is not None
        clock[0] = handoff.ttl_s + 1
        # past its TTL it is not served, even before the sweep that frees it has run
        assert prefill.handoffs.pin(list(handoff.block_keys)) is None
        assert prefill.connector.export(list(handoff.block_keys)) is None
        assert prefill.expire_handoffs() == 1
        assert prefill.connector.export(list(handoff.block_keys)) is None  # unknown keys: nothing to fetch
        assert prefill.block_manager.num_free_blocks == free
        assert not prefill.release_handoff(handoff.handoff_id)
    finally:
        prefill.handoffs.clock = __import__("time").monotonic


def test_bad_handles_are_refused(engines):
    _, prefill, decode = engines
    prompt = _prompt(40)
    params = SamplingParams(temperature=0.0, max_tokens=4, seed=3)
    good = Handoff("h1", tuple(bytes(16) for _ in range(3)), 40, BS, 7, source_address="p:1")
    decode.make_request(prompt, params, "ok", handoff=good)
    bad = {
        "holds the KV of 41": dict(num_tokens=41),
        "blocks have 8": dict(block_size=8),
        "needs 3": dict(block_keys=(bytes(16),) * 2),
        "must be 16 bytes": dict(block_keys=(bytes(16), bytes(16), bytes(3))),
        "first token": dict(first_token_id=10**6),
        "no source address": dict(source_address=""),
        "sampler state": dict(sampler_state=b"\x00" * 7),
    }
    for message, change in bad.items():
        h = Handoff(**{**{f: getattr(good, f) for f in good.__slots__}, **change})
        with pytest.raises(InvalidRequestError, match=message):
            decode.make_request(prompt, params, "bad", handoff=h)
    with pytest.raises(InvalidRequestError, match="max_tokens >= 2"):
        decode.make_request(prompt, SamplingParams(max_tokens=1), "bad", handoff=good)
    with pytest.raises(InvalidRequestError, match="both"):
        decode.make_request(prompt, params, "bad", handoff=good, prefill_only=True)
    assert RequestStatus.FINISHED_HANDOFF.finish_reason == "handoff"
    assert torch.Generator().get_state().numel() > 7  # the refused state above is really malformed


def test_early_handle_names_blocks_as_they_are_computed(engines):
    _, prefill, _ = engines
    prompt = _prompt(150, 41)  # 10 blocks, the last partial; 64 tokens per step
    params = SamplingParams(temperature=0.0, max_tokens=4)
    free = prefill.block_manager.num_free_blocks
    prefill.submit(prefill.make_request(prompt, params, "p-early", prefill_only=True))
    outs = prefill.step()
    (early,) = [o for o in outs if o.handoff is not None]
    h = early.handoff
    assert not early.finished and not h.complete and len(h.block_keys) == 10
    assert Handoff(**{**{f: getattr(h, f) for f in h.__slots__}, "source_address": "p:1"}).check(150, BS) \
        == "the handoff is not complete (its first token is not known yet)"
    ready = []
    while prefill.has_unfinished():
        kv = prefill.connector.export(list(h.block_keys))
        ready.append(0 if kv is None else kv.shape[0])
        req = prefill.scheduler.requests.get("p-early")
        if req is not None:
            assert ready[-1] == req.num_computed_tokens // BS  # exactly the computed blocks
        outs = prefill.step()
    final = next(o for o in outs if o.finished)
    assert final.handoff.block_keys == h.block_keys and final.handoff.complete
    assert ready == sorted(ready) and 0 < ready[1] < 9  # it grew step by step
    assert prefill.connector.export(list(h.block_keys)).shape[0] == 10  # held: the partial last block too
    assert prefill.release_handoff(h.handoff_id)
    assert prefill.block_manager.num_free_blocks == free


def test_pinned_handoff_is_freed_after_its_last_reader(engines):
    _, prefill, _ = engines
    free = prefill.block_manager.num_free_blocks
    h = _prefill(prefill, _prompt(40, 13), SamplingParams(temperature=0.0, max_tokens=3), "p-pin")
    handoff_id, blocks = prefill.handoffs.pin(list(h.block_keys))
    assert handoff_id == h.handoff_id and len(blocks) == 3
    want = prefill.connector.export(list(h.block_keys))
    assert torch.equal(prefill.connector.export_blocks(blocks), want)
    assert prefill.release_handoff(h.handoff_id)  # released while a reader copies: the blocks stay
    assert prefill.handoffs.pin(list(h.block_keys)) is None  # no new reader gets in
    prefill.expire_handoffs()
    assert prefill.block_manager.num_free_blocks == free - 3
    prefill.handoffs.unpin(handoff_id)
    prefill.expire_handoffs()  # the engine loop frees them at its next turn
    assert prefill.block_manager.num_free_blocks == free
