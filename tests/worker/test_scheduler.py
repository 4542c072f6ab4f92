"""Scheduler + block manager, driven directly with a fake model (no tensors).

The fake model's next token is a pure function of the whole sequence, so a request that is
preempted and recomputed must produce exactly the tokens it would have produced alone.
"""
from __future__ import annotations

import pytest

from worker.block_manager import BlockManager
from worker.config import ConfigError
from worker.engine_config import EngineConfig
from worker.output import check_stop
from worker.request import Request, RequestStatus
from worker.scheduler import Scheduler, SchedulerConfig
from worker.scheduler_output import SchedulerOutput


def fake_next_token(tokens: list[int]) -> int:
    return sum((i + 1) * t for i, t in enumerate(tokens)) % 97 + 3


def fake_greedy(prompt: list[int], max_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(fake_next_token(seq))
    return seq[len(prompt):]


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size))


class RunnerView:
    """What a model runner knows, rebuilt from the scheduler's outputs alone (new requests in full,
    running ones as diffs), to check that those outputs are enough."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def apply(self, out: SchedulerOutput) -> None:
        for req_id in [*out.finished_req_ids, *out.preempted_req_ids]:
            self.tokens.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            self.tokens[new.req_id], self.blocks[new.req_id] = list(new.token_ids), list(new.block_ids)
            self.computed[new.req_id] = new.num_computed_tokens
        c = out.scheduled_cached_reqs
        for req_id, blocks, n in zip(c.req_ids, c.new_block_ids, c.num_computed_tokens):
            self.blocks[req_id].extend(blocks)
            self.computed[req_id] = n


def runner_view(sched: Scheduler) -> RunnerView:
    if not hasattr(sched, "runner_view"):
        sched.runner_view = RunnerView()
    return sched.runner_view


def scheduled(sched: Scheduler, out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(req id, first position, tokens, samples) of each scheduled request, from the runner's view."""
    view = runner_view(sched)
    view.apply(out)
    return [(r, view.computed[r], n, view.computed[r] + n == len(view.tokens[r]))
            for r, n in out.num_scheduled_tokens.items()]


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    is_decode = [n == 1 for n in out.num_scheduled_tokens.values()]
    assert is_decode == sorted(is_decode, reverse=True), "decodes must come before prefill chunks"
    view = runner_view(sched)
    items = scheduled(sched, out)
    for req_id, start, n, sample in items:
        req = sched.requests[req_id]
        assert req.status == RequestStatus.RUNNING
        assert start == req.num_computed_tokens
        assert view.tokens[req_id] == req.all_token_ids  # the diffs kept the runner in sync
        assert sample == (start + n == req.num_tokens)
        assert len(view.blocks[req_id]) * sched.block_manager.block_size >= start + n
        assert view.blocks[req_id] == sched.block_manager.get_block_table(req_id)
    return items


def finish_if_done(sched: Scheduler, req: Request, eos: frozenset[int] = frozenset()) -> None:
    status = check_stop(req, eos, sched.config.max_model_len)
    if status is not None:
        sched.finish(req.req_id, status)


def step(sched: Scheduler) -> SchedulerOutput:
    """One schedule -> fake forward -> update cycle; checks the scheduler's invariants."""
    out = sched.schedule()
    items = check_invariants(sched, out)
    sampled = {r: fake_next_token(sched.requests[r].all_token_ids) for r, _, _, sample in items if sample}
    for req in sched.update_from_output(out, sampled):
        runner_view(sched).tokens[req.req_id].append(req.output_token_ids[-1])
        finish_if_done(sched, req)
    out.items = items
    return out


def summary(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return out.items


def run_to_completion(sched: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched))
        assert len(outs) <= max_steps, "the scheduler made no progress"
    return outs


def prompt(n: int, start: int = 10) -> list[int]:
    return list(range(start, start + n))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)
    # Without chunking a whole prompt must fit in one step's budget.
    assert SchedulerConfig(max_num_batched_tokens=8, enable_chunked_prefill=False,
                           max_model_len=64).max_num_batched_tokens == 64


def test_token_budget_is_respected_and_filled(make_request) -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    lengths = [3, 40, 7, 25, 1]
    reqs = [make_request(f"r{i}", prompt(n, 10 * i), max_tokens=5) for i, n in enumerate(lengths)]
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched)
    assert all(o.total_num_scheduled_tokens <= 16 for o in outs)
    total_work = sum(lengths) + 4 * len(reqs)  # every prompt token + 4 decodes each
    assert sum(o.total_num_scheduled_tokens for o in outs) == total_work
    # While there is prefill work left, the budget is used in full.
    assert [o.total_num_scheduled_tokens for o in outs[:4]] == [16, 16, 16, 16]
    for r, n in zip(reqs, lengths):
        assert r.output_token_ids == fake_greedy(prompt(n, 10 * int(r.req_id[1:])), 5)
        assert r.status == RequestStatus.FINISHED_LENGTH


def test_decodes_are_scheduled_before_prefill_chunks(make_request) -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    a, b = make_request("a", prompt(3), max_tokens=4), make_request("b", prompt(20, 50), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    assert summary(step(sched)) == [("a", 0, 3, True), ("b", 0, 5, False)]
    assert summary(step(sched)) == [("a", 3, 1, True), ("b", 5, 7, False)]
    assert summary(step(sched)) == [("a", 4, 1, True), ("b", 12, 7, False)]
    assert summary(step(sched)) == [("a", 5, 1, True), ("b", 19, 1, True)]
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert summary(step(sched)) == [("b", 20, 1, True)]
    assert not sched.has_unfinished()
    assert b.output_token_ids == fake_greedy(prompt(20, 50), 2)


def test_chunked_prefill_splits_a_long_prompt_across_steps(make_request) -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    req = make_request("a", prompt(20), max_tokens=2)
    sched.add_request(req)
    tables = []
    for expected in [("a", 0, 8, False), ("a", 8, 8, False), ("a", 16, 4, True), ("a", 20, 1, True)]:
        out = step(sched)
        assert summary(out) == [expected]
        tables.append(list(runner_view(sched).blocks["a"]))
    assert tables == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert req.output_token_ids == fake_greedy(prompt(20), 2)
    assert sched.block_manager.num_free_blocks == 64


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
    import random

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


def test_without_chunking_a_prompt_is_scheduled_whole(make_request) -> None:
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False, max_model_len=64)
    a, b = make_request("a", prompt(20), max_tokens=3), make_request("b", prompt(50, 40), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    assert summary(step(sched)) == [("a", 0, 20, True)]  # b (50) does not fit in what is left (44)
    assert summary(step(sched)) == [("a", 20, 1, True), ("b", 0, 50, True)]
    run_to_completion(sched)
    assert a.output_token_ids == fake_greedy(prompt(20), 3)
    assert b.output_token_ids == fake_greedy(prompt(50, 40), 2)


def test_max_num_seqs_caps_running_requests(make_request) -> None:
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", prompt(4, 10 * i), max_tokens=3) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    scheduled_ids = [list(step(sched).num_scheduled_tokens) for _ in range(6)]
    assert scheduled_ids == [["r0", "r1"]] * 3 + [["r2", "r3"]] * 3
    assert not sched.has_unfinished()
    for i, r in enumerate(reqs):
        assert r.output_token_ids == fake_greedy(prompt(4, 10 * i), 3)


def test_preemption_by_recompute_when_blocks_run_out(make_request) -> None:
    # 4 blocks of 4 tokens; each request ends at 12 tokens (3 blocks), so both cannot finish together.
    sched = make_scheduler(num_blocks=4, block_size=4)
    bm = sched.block_manager
    a, b = make_request("a", prompt(6), max_tokens=6), make_request("b", prompt(6, 60), max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(3):
        out = step(sched)
        assert list(out.num_scheduled_tokens) == ["a", "b"] and out.preempted_req_ids == []
    assert (bm.get_block_table("a"), bm.get_block_table("b")) == ([0, 1], [2, 3])
    # a needs a third block for its 9th token: b, the most recently admitted, is preempted.
    out = step(sched)
    assert out.preempted_req_ids == ["b"]
    assert summary(out) == [("a", 8, 1, True)]
    assert list(sched.waiting) == [b] and sched.running == [a]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert b.output_token_ids == fake_greedy(prompt(6, 60), 3)  # outputs so far are kept
    assert bm.get_block_table("b") == []
    assert bm.get_block_table("a") == [0, 1, 3]  # b's blocks went back tail first; a took the first
    assert bm.free_queue.block_ids() == [2]
    # b waits until a finishes, then resumes from the cached head of its own sequence.
    outs = run_to_completion(sched)
    resumed = next(s for o in outs for s in o.items if s[0] == "b")
    assert resumed == ("b", 4, 5, True)
    assert a.output_token_ids == fake_greedy(prompt(6), 6)
    assert b.output_token_ids == fake_greedy(prompt(6, 60), 6)
    assert (a.status, b.status) == (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_LENGTH)
    assert bm.num_free_blocks == 4


def test_preemption_of_many_requests_gives_the_same_outputs(make_request) -> None:
    lengths = [5, 9, 14, 3, 11]
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=12)
    reqs = [make_request(f"r{i}", prompt(n, 7 * i), max_tokens=8) for i, n in enumerate(lengths)]
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched)
    assert sum(len(o.preempted_req_ids) for o in outs) > 0
    for i, (r, n) in enumerate(zip(reqs, lengths)):
        assert r.output_token_ids == fake_greedy(prompt(n, 7 * i), 8)
    assert sched.block_manager.num_free_blocks == 8


def test_abort_of_waiting_and_running_requests_frees_blocks(make_request) -> None:
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    a, b = make_request("a", prompt(9)), make_request("b", prompt(5))
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.running == [a] and list(sched.waiting) == [b]
    assert sched.block_manager.num_free_blocks == 5
    assert sched.finish("b", RequestStatus.FINISHED_ABORTED) is b
    assert b.status == RequestStatus.FINISHED_ABORTED and b.status.finish_reason == "abort"
    assert list(sched.waiting) == [] and "b" not in sched.requests
    assert sched.finish("a", RequestStatus.FINISHED_ABORTED) is a
    assert sched.running == [] and sched.block_manager.num_free_blocks == 8
    assert sched.block_manager.get_block_table("a") == []
    assert sched.finish("a", RequestStatus.FINISHED_ABORTED) is None
    assert not sched.has_unfinished()
    assert sched.schedule().num_scheduled_tokens == {}


def test_abort_between_schedule_and_update(make_request) -> None:
    sched = make_scheduler(num_blocks=8)
    a, b = make_request("a", prompt(9)), make_request("b", prompt(5, 50))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.finish("a", RequestStatus.FINISHED_ABORTED)
    updated = sched.update_from_output(out, {"a": 3, "b": 4})
    assert updated == [b]
    assert a.output_token_ids == [] and b.output_token_ids == [4]
    assert sched.block_manager.get_block_table("a") == []
    assert sched.block_manager.num_free_blocks == 8 - 2


def test_abort_of_a_preempted_request(make_request) -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_request("a", prompt(6), max_tokens=6), make_request("b", prompt(6, 60), max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(4):
        step(sched)
    assert b.status == RequestStatus.PREEMPTED
    assert sched.finish("b", RequestStatus.FINISHED_ABORTED) is b
    assert list(sched.waiting) == []
    run_to_completion(sched)
    assert a.output_token_ids == fake_greedy(prompt(6), 6)
    assert sched.block_manager.num_free_blocks == 4


def drive(sched: Scheduler, req: Request, tokens: list[int], eos: frozenset[int] = frozenset()) -> None:
    """Feed `tokens` as the model's samples until the request finishes or they run out."""
    sched.add_request(req)
    for tok in tokens:
        if req.status.finished:
            return
        out = sched.schedule()
        for r in sched.update_from_output(out, {req.req_id: tok}):
            finish_if_done(sched, r, eos)


@pytest.mark.parametrize("params, tokens, expected_outputs, status, stop_reason", [
    ({"ignore_eos": False}, [5, 2, 6], [5, 2], RequestStatus.FINISHED_STOPPED, None),
    ({"ignore_eos": True, "max_tokens": 3}, [5, 2, 6, 7], [5, 2, 6], RequestStatus.FINISHED_LENGTH, None),
    ({"ignore_eos": False, "min_tokens": 3}, [2, 2, 2, 6], [2, 2, 2], RequestStatus.FINISHED_STOPPED, None),
    ({"stop_token_ids": [7]}, [5, 7, 6], [5, 7], RequestStatus.FINISHED_STOPPED, 7),
    ({"max_tokens": 2}, [5, 6, 7], [5, 6], RequestStatus.FINISHED_LENGTH, None),
])
def test_stop_conditions(make_request, params, tokens, expected_outputs, status, stop_reason) -> None:
    sched = Scheduler(SchedulerConfig(), BlockManager(16, 4))
    req = make_request("a", prompt(5), **params)
    drive(sched, req, tokens, eos=frozenset({2}))
    assert req.output_token_ids == expected_outputs
    assert (req.status, req.stop_reason) == (status, stop_reason)
    assert sched.block_manager.num_free_blocks == 16


def test_context_length_ends_a_request(make_request) -> None:
    sched = Scheduler(SchedulerConfig(max_model_len=8), BlockManager(16, 4))
    req = make_request("a", prompt(6), max_tokens=10)
    drive(sched, req, [5, 6, 7, 8])
    assert req.output_token_ids == [5, 6]
    assert req.status == RequestStatus.FINISHED_LENGTH


def test_deep_prefill_chunks_are_charged_for_their_attention(make_request):
    """With attention_cost_len L, a chunk of n tokens at position p costs n * (1 + (p + n/2) / L)."""
    from worker.block_manager import BlockManager
    from worker.scheduler import Scheduler, SchedulerConfig

    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100, max_model_len=4096, attention_cost_len=200)
    sched = Scheduler(cfg, BlockManager(num_blocks=64, block_size=16))
    sched.add_request(make_request("long", list(range(1, 601))))
    sizes = []
    for _ in range(20):
        out = sched.schedule()
        (_, p, n, sample), = scheduled(sched, out)
        if sample:
            break
        assert n * (1 + (p + n / 2) / 200) <= 100 + 1e-9
        sizes.append(n)
        sched.update_from_output(out, {})
    # n = floor(L * (sqrt(a^2 + 2B/L) - a)), a = 1 + p/L: p=0 -> 82, p=82 -> 63, p=145 -> 53, ...
    assert sizes[:3] == [82, 63, 53]
    assert sizes == sorted(sizes, reverse=True)


def test_requests_sharing_a_prefix_compute_it_once_in_one_step(make_request) -> None:
    """Requests that arrive together with one prefix compute it once: the first computes the
    shared blocks and the others, in the same step, take those blocks as hits and compute only
    what follows them (the forward writes every token's K/V before attending)."""
    sched = make_scheduler(max_num_batched_tokens=64, block_size=4)
    shared = prompt(16, 100)
    a, b, c = (make_request(r, shared + prompt(6, 200 + 10 * i), max_tokens=3) for i, r in enumerate("abc"))
    other = make_request("other", prompt(20, 500), max_tokens=3)
    for r in (a, b, c, other):
        sched.add_request(r)
    first = step(sched)
    assert [(r, start, n) for r, start, n, _ in first.items] == [("a", 0, 22), ("b", 16, 6), ("c", 16, 6),
                                                                    ("other", 0, 20)]
    table = sched.block_manager.get_block_table
    assert table("b")[:4] == table("a")[:4] == table("c")[:4]  # the shared blocks, computed once
    assert len(set(table("b")[4:]) | set(table("c")[4:]) | set(table("a")[4:])) == 6
    assert b.num_cached_tokens == c.num_cached_tokens == 16
    run_to_completion(sched)
    for r, i in ((a, 0), (b, 1), (c, 2)):
        assert r.output_token_ids == fake_greedy(shared + prompt(6, 200 + 10 * i), 3)


def test_requests_sharing_a_prefix_computed_in_a_later_step_wait_for_it(make_request) -> None:
    """When the step's budget ends inside the shared prefix, the sharers are held back (others
    with a different prefix go ahead), and a later step finds the prefix cached."""
    sched = make_scheduler(max_num_batched_tokens=12, block_size=4)
    shared = prompt(16, 100)
    a, b = (make_request(r, shared + prompt(3, 200 + 10 * i), max_tokens=2) for i, r in enumerate("ab"))
    other = make_request("other", prompt(3, 500), max_tokens=2)
    for r in (a, b, other):
        sched.add_request(r)
    first = step(sched)
    assert [(r, start, n) for r, start, n, _ in first.items] == [("a", 0, 12)]  # other: no budget left
    assert [r.req_id for r in sched.waiting] == ["b", "other"]  # b held back, in its order
    second = step(sched)
    # a completes the shared blocks in this step; b shares them in it
    assert [(r, start, n) for r, start, n, _ in second.items] == [("a", 12, 7), ("b", 16, 3), ("other", 0, 2)]
    run_to_completion(sched)
    for r, i in ((a, 0), (b, 1)):
        assert r.output_token_ids == fake_greedy(shared + prompt(3, 200 + 10 * i), 2)


def test_a_chunked_prefix_holds_back_its_sharers_until_computed(make_request) -> None:
    """A long shared prefix computed in chunks over several steps: the request sharing it waits
    until the step that completes the blocks it needs, then computes only its own tail."""
    sched = make_scheduler(max_num_batched_tokens=16, block_size=4)
    shared = prompt(40, 100)
    a = make_request("a", shared + [7, 8], max_tokens=2)
    b = make_request("b", shared + [9], max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(20):
        a_done = a.num_computed_tokens
        out = step(sched)
        if "b" in out.num_scheduled_tokens:
            break
    assert a_done < 40 <= a_done + out.num_scheduled_tokens["a"]  # b waited while a computed the shared blocks
    assert [(start, n) for r, start, n, _ in out.items if r == "b"] == [(40, 1)]
    run_to_completion(sched)
    assert b.output_token_ids == fake_greedy(shared + [9], 2)
