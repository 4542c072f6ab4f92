"""Where an engine's steps spend their time, by phase, counted since the engine started.

Phases of one `LLMEngine.step()`:
- schedule: the scheduler's decision and the KV connector's loads started for it;
- prepare: the model runner's batch inputs (token ids, positions, slots, attention metadata);
- forward: the model's forward over the batch (to the last hidden states);
- sample: the vocabulary projection of the sampled rows and the sampler;
- update: the scheduler's and the output processor's bookkeeping of the sampled tokens
  (detokenizing, stop checks), and the prefill handoffs.
Steps are counted by kind: `decode` (every scheduled request decodes one token) or `mixed`
(some prefill). On a GPU, forward's kernels run asynchronously and their time shows in sample,
which waits for the sampled tokens. Read by the benchmarks (`kvweave bench engine`) and exported
as `kvweave_worker_step_seconds_total` and `kvweave_worker_steps_total` (worker/metrics.py).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

PHASES = ("schedule", "prepare", "forward", "sample", "update")
STEP_KINDS = ("decode", "mixed")


class StepProfile:
    def __init__(self) -> None:
        self.seconds = {kind: dict.fromkeys(PHASES, 0.0) for kind in STEP_KINDS}
        self.steps = dict.fromkeys(STEP_KINDS, 0)
        self.kind = "decode"
        """The kind of the step being timed (set once it is scheduled)."""

    def reset(self) -> None:
        for kind in STEP_KINDS:
            self.seconds[kind] = dict.fromkeys(PHASES, 0.0)
            self.steps[kind] = 0

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[self.kind][name] += time.perf_counter() - t0

    def begin(self, kind: str, scheduled_s: float) -> None:
        """A step of this kind starts computing, after `scheduled_s` seconds of scheduling."""
        self.kind = kind
        self.steps[kind] += 1
        self.seconds[kind]["schedule"] += scheduled_s

    def snapshot(self) -> dict:
        """{kind: {"steps": n, "ms_per_step": {phase: ms}}}: the mean per step of each kind."""
        return {kind: {"steps": self.steps[kind],
                       "ms_per_step": {p: round(s * 1e3 / max(1, self.steps[kind]), 3)
                                       for p, s in self.seconds[kind].items()}}
                for kind in STEP_KINDS}
