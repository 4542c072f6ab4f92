"""The scheduler's test harness: a fake model (no tensors) and the step loop that checks every
scheduler output against what a model runner would know.

The fake model's next token is a pure function of the whole sequence, so a request that is
preempted and recomputed must produce exactly the tokens it would have produced alone.
"""
from __future__ import annotations

from worker.block_manager import BlockManager
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
