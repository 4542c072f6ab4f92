"""Long prompts (worker/scheduler.py's long-prefill settings): the threshold's chunks, short prompts
admitted past long ones, the chunk cap, short prompts first, several long prompts a step, and their
validation; driven with the fake model of tests/worker/scheduler_harness.py."""
from __future__ import annotations

import random

import pytest

from tests.worker.scheduler_harness import fake_greedy, make_scheduler, prompt, run_to_completion, step, summary
from worker.config import ConfigError
from worker.engine_config import EngineConfig
from worker.scheduler import SchedulerConfig


def test_long_prompts_take_threshold_chunks_and_short_ones_overtake_them(make_request) -> None:
    """With long_prefill_token_threshold 8 and one long partial prefill a step: the first long prompt
    gets 8 tokens a step, the second long one waits at the head of the queue while the short prompts
    that arrived after both are admitted in full, and every request still gets its own tokens."""
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    img_a, img_b = make_request("a", prompt(20), max_tokens=2), make_request("b", prompt(18, 100), max_tokens=2)
    text = make_request("t", prompt(6, 200), max_tokens=2)
    for r in (img_a, img_b, text):
        sched.add_request(r)
    assert summary(step(sched)) == [("a", 0, 8, False), ("t", 0, 6, True)]
    assert [r.req_id for r in sched.waiting] == ["b"]
    later = make_request("u", prompt(5, 300), max_tokens=1)
    sched.add_request(later)
    # a's 12 left are still long; u (short) is admitted past b; t decodes first.
    assert summary(step(sched)) == [("t", 6, 1, True), ("a", 8, 8, False), ("u", 0, 5, True)]
    # a's last 4 are short: b, long, gets its first 8 in the same step.
    assert summary(step(sched)) == [("a", 16, 4, True), ("b", 0, 8, False)]
    run_to_completion(sched)
    for r, p in ((img_a, prompt(20)), (img_b, prompt(18, 100)), (text, prompt(6, 200)), (later, prompt(5, 300))):
        assert r.output_token_ids == fake_greedy(p, r.params.max_tokens)


def test_prioritized_short_prompts_leave_long_ones_the_rest_of_the_threshold(make_request) -> None:
    """With prioritize_short_prefills a step's short prompts are scheduled before its long one, whose
    chunk takes what their prefill tokens leave of the threshold (at least one token); decodes take
    nothing from it, and a waiting long prompt still keeps its place at the head of the queue."""
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8, prioritize_short_prefills=True)
    long_a = make_request("a", prompt(30), max_tokens=2)
    sched.add_request(long_a)
    assert summary(step(sched)) == [("a", 0, 8, False)]
    text = make_request("t", prompt(6, 200), max_tokens=3)
    sched.add_request(text)
    assert summary(step(sched)) == [("t", 0, 6, True), ("a", 8, 2, False)]
    assert summary(step(sched)) == [("t", 6, 1, True), ("a", 10, 8, False)]
    later = [make_request("b", prompt(20, 100), max_tokens=1), make_request("u", prompt(5, 300), max_tokens=1),
             make_request("v", prompt(5, 400), max_tokens=1)]
    for r in later:
        sched.add_request(r)
    # u and v prefill 10 tokens, more than the threshold: a still gets one (a one-token row, sent
    # with the decodes); b (long) waits.
    assert summary(step(sched)) == [("t", 7, 1, True), ("a", 18, 1, False), ("u", 0, 5, True), ("v", 0, 5, True)]
    assert [r.req_id for r in sched.waiting] == ["b"]
    run_to_completion(sched)
    for r, p in ((long_a, prompt(30)), (text, prompt(6, 200)), (later[0], prompt(20, 100)),
                 (later[1], prompt(5, 300)), (later[2], prompt(5, 400))):
        assert r.output_token_ids == fake_greedy(p, r.params.max_tokens)


def test_long_prefill_chunk_tokens_caps_long_chunks_below_the_threshold(make_request) -> None:
    """The threshold (8) still decides which prompts are long; their chunks are 3 tokens, and with
    prioritize_short_prefills a short prompt's prefill leaves them less (8 - 6 = 2)."""
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8, long_prefill_chunk_tokens=3,
                           prioritize_short_prefills=True)
    long_a, text = make_request("a", prompt(20), max_tokens=1), make_request("t", prompt(6, 200), max_tokens=1)
    sched.add_request(long_a)
    assert summary(step(sched)) == [("a", 0, 3, False)]
    sched.add_request(text)
    assert summary(step(sched)) == [("t", 0, 6, True), ("a", 3, 2, False)]
    assert [summary(step(sched)) for _ in range(4)] == [[("a", 5, 3, False)], [("a", 8, 3, False)],
                                                        [("a", 11, 3, False)], [("a", 14, 6, True)]]  # 6: short
    assert long_a.output_token_ids == fake_greedy(prompt(20), 1)


@pytest.mark.parametrize("settings", [
    {},
    {"long_prefill_token_threshold": 12},
    {"long_prefill_token_threshold": 12, "long_prefill_chunk_tokens": 5},
    {"long_prefill_token_threshold": 12, "prioritize_short_prefills": True},
    {"long_prefill_token_threshold": 12, "long_prefill_chunk_tokens": 3, "prioritize_short_prefills": True,
     "max_long_partial_prefills": 2},
])
def test_random_arrivals_under_each_long_prefill_setting(make_request, settings) -> None:
    """Seeded random prompts (2-40 tokens) arriving over the steps, with few enough blocks that
    requests are preempted: every step keeps the invariants (`step`), no long prompt takes more than
    its cap, every request finishes with its own tokens, and every block comes back."""
    rng = random.Random(7)
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=32, **settings)
    threshold = settings.get("long_prefill_token_threshold", 0)
    cap = settings.get("long_prefill_chunk_tokens") or threshold
    arrivals = sorted((rng.randrange(30), rng.randrange(2, 41), rng.randrange(1, 6)) for _ in range(24))
    reqs, steps, long_chunks = [], 0, 0
    while arrivals or sched.has_unfinished():
        while arrivals and arrivals[0][0] <= steps:
            _, n, max_tokens = arrivals.pop(0)
            reqs.append((make_request(f"r{len(reqs)}", prompt(n, 50 * len(reqs)), max_tokens=max_tokens), n))
            sched.add_request(reqs[-1][0])
        left = {r.req_id: r.num_tokens - r.num_computed_tokens for r in sched.running}
        out = step(sched)
        if threshold:
            long = [(r, n) for r, _, n, _ in out.items if left.get(r, 0) > threshold or n > threshold]
            assert all(n <= cap for _, n in long), (settings, out.items)
            assert len([1 for r, n in long if n > 1]) <= settings.get("max_long_partial_prefills", 1)
            long_chunks += len(long)
        steps += 1
        assert steps < 1000, "the scheduler made no progress"
    for req, n in reqs:
        assert req.output_token_ids == fake_greedy(prompt(n, 50 * int(req.req_id[1:])), req.params.max_tokens)
    assert sched.block_manager.num_free_blocks == 16
    assert sum(req.num_preemptions for req, _ in reqs) > 0
    assert long_chunks > 0 or not threshold


def test_max_long_partial_prefills_lets_several_long_prompts_share_a_step(make_request) -> None:
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8, max_long_partial_prefills=2)
    for i in range(3):
        sched.add_request(make_request(f"l{i}", prompt(30, 100 * i), max_tokens=1))
    assert summary(step(sched)) == [("l0", 0, 8, False), ("l1", 0, 8, False)]
    assert summary(step(sched)) == [("l0", 8, 8, False), ("l1", 8, 8, False)]
    with pytest.raises(ConfigError, match="long_prefill_token_threshold"):
        SchedulerConfig(long_prefill_token_threshold=-1)
    with pytest.raises(ConfigError, match="max_long_partial_prefills"):
        SchedulerConfig(max_long_partial_prefills=0)
    with pytest.raises(ConfigError, match=r"long_prefill_chunk_tokens must be in \[0, long_prefill_token_threshold = 8\]"):
        SchedulerConfig(long_prefill_token_threshold=8, long_prefill_chunk_tokens=9)
    for kwargs in ({"long_prefill_chunk_tokens": 4}, {"prioritize_short_prefills": True}):
        with pytest.raises(ConfigError, match="need a long_prefill_token_threshold"):
            SchedulerConfig(**kwargs)
        with pytest.raises(ConfigError, match="need a long_prefill_token_threshold"):
            EngineConfig(**kwargs)  # the engine's flags, checked before a model loads
