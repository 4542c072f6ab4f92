"""Scheduler + block manager, driven directly with the fake model of tests/worker/scheduler_harness.py
(no tensors): the token budget, decodes first, chunked prefill, preemption by recompute, aborts,
stop conditions, attention-charged chunks and shared prefixes (long prompts:
test_scheduler_long_prefill.py)."""
from __future__ import annotations

import pytest

from tests.worker.scheduler_harness import (fake_greedy, finish_if_done, make_scheduler, prompt, run_to_completion,
                                            runner_view, scheduled, step, summary)
from worker.block_manager import BlockManager
from worker.config import ConfigError
from worker.request import Request, RequestStatus
from worker.scheduler import Scheduler, SchedulerConfig


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
