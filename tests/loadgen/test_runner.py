"""The runner with a scripted in-memory backend: request counting over multi-turn sessions, chat
history, concurrency limits, arrival times, --duration, pauses, and stopping with requests in flight."""
from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest

from loadgen.arrivals import ArrivalProcess
from loadgen.backends import Backend, RequestFailed
from loadgen.runner import RunConfig, Runner
from loadgen.types import Session, Turn


class FakeBackend(Backend):
    """Replies after `delay` seconds with `max_tokens` tokens; `fail(turn)` -> an error kind or None."""

    name = "fake"

    def __init__(self, delay: float = 0.0, fail=lambda turn: None) -> None:
        super().__init__("fake://")
        self.delay, self.fail = delay, fail
        self.sent: list[tuple[str, list[dict], Turn, float]] = []
        self.in_flight = self.max_in_flight = 0

    async def _list_models(self) -> list[str]:
        return ["fake-model"]

    async def _stream(self, turn, history, session_id, record) -> None:
        self.sent.append((session_id, list(history), turn, time.perf_counter()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            kind = self.fail(turn)
            if kind:
                raise RequestFailed(kind, "scripted failure")
            record.ttft, record.output_tokens, record.text = self.delay, turn.max_tokens, f"reply {len(self.sent)}"
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        pass


class FakeWorkload:
    name = "fake"

    def __init__(self, sessions) -> None:
        self._sessions = sessions

    def sessions(self):
        return iter(self._sessions)


def chat_session(i: int, turns: int = 3, pause_s: float = 0.0) -> Session:
    return Session(f"s{i}", [Turn(max_tokens=2, messages=({"role": "user", "content": f"s{i} t{k}"},),
                                  pause_s=pause_s) for k in range(turns)])


def endless(max_tokens: int = 1):
    return (Session(f"s{i}", [Turn(max_tokens=max_tokens, token_ids=(1, 2, 3))]) for i in itertools.count())


def run(sessions, backend: FakeBackend, **config):
    runner = Runner(FakeWorkload(sessions), backend, RunConfig(progress=False, **config), log=lambda _: None)
    return asyncio.run(runner.run())


def test_requests_are_counted_in_turns_and_chat_history_grows() -> None:
    backend = FakeBackend()
    result = run([chat_session(i) for i in range(5)], backend, num_requests=7, max_concurrency=1)
    assert len(result.records) == len(backend.sent) == 7
    assert [s for s, *_ in backend.sent] == ["s0"] * 3 + ["s1"] * 3 + ["s2"]  # the third session is cut short
    _, history, turn, _ = backend.sent[2]
    assert history == [{"role": "user", "content": "s0 t0"}, {"role": "assistant", "content": "reply 1"},
                       {"role": "user", "content": "s0 t1"}, {"role": "assistant", "content": "reply 2"}]
    assert turn.messages[0]["content"] == "s0 t2"
    assert backend.sent[3][1] == []  # a new session starts without history


def test_a_failed_turn_ends_its_session_and_its_requests_go_to_other_sessions() -> None:
    backend = FakeBackend(fail=lambda turn: "http_500" if turn.messages[0]["content"] == "s0 t0" else None)
    result = run([chat_session(i, turns=2) for i in range(5)], backend, num_requests=4, max_concurrency=1)
    assert [s for s, *_ in backend.sent] == ["s0", "s1", "s1", "s2"]
    assert [r.error for r in result.records] == ["http_500", None, None, None]


def test_records_carry_their_session_tags() -> None:
    sessions = [Session(f"s{i}", [Turn(max_tokens=1, token_ids=(1,))], tags={"class": c})
                for i, c in enumerate(["long", "short", "short"])]
    result = run([*sessions, chat_session(3, turns=2)], FakeBackend(), max_concurrency=1)
    assert [(r.session_id, r.tags) for r in result.records] == [
        ("s0", {"class": "long"}), ("s1", {"class": "short"}), ("s2", {"class": "short"}), ("s3", {}), ("s3", {})]


def test_the_workload_running_out_ends_the_run() -> None:
    result = run([chat_session(0, turns=2)], FakeBackend(), num_requests=100)
    assert len(result.records) == 2


def test_max_concurrency_bounds_requests_in_flight() -> None:
    backend = FakeBackend(delay=0.05)
    result = run(endless(), backend, num_requests=12, max_concurrency=3)
    assert len(result.records) == 12 and backend.max_in_flight == 3
    unlimited = FakeBackend(delay=0.05)
    run(endless(), unlimited, num_requests=12)
    assert unlimited.max_in_flight == 12


def test_poisson_arrivals_follow_the_process() -> None:
    backend = FakeBackend()
    result = run(endless(), backend, num_requests=8, request_rate=20.0, seed=3)
    expected = list(itertools.accumulate(itertools.islice(ArrivalProcess(20.0, seed=3).gaps(), 7), initial=0.0))
    starts = [r.start - result.start for r in result.records]
    assert starts == pytest.approx(expected, abs=0.05)
    assert "Poisson" in result.arrivals


def test_trace_timestamps_unless_a_rate_is_given() -> None:
    def traced():
        return [Session(f"s{i}", [Turn(max_tokens=1, token_ids=(1,))], arrival_s=0.1 * i) for i in range(4)]

    result = run(traced(), FakeBackend())
    assert [r.start - result.start for r in result.records] == pytest.approx([0, 0.1, 0.2, 0.3], abs=0.05)
    assert result.arrivals == "trace timestamps"
    at_once = run(traced(), FakeBackend(), request_rate=math.inf)
    assert max(r.start - at_once.start for r in at_once.records) < 0.05


def test_duration_stops_sending_and_waits_for_requests_in_flight() -> None:
    backend = FakeBackend(delay=0.1)
    t0 = time.perf_counter()
    result = run(endless(), backend, num_requests=None, duration=0.3, request_rate=40.0)
    assert 0.3 <= time.perf_counter() - t0 < 1.0
    assert 5 <= len(result.records) <= 25
    assert all(r.ok for r in result.records)  # in flight at the deadline: awaited, not cut
    assert max(r.start for r in result.records) - result.start <= 0.3


def test_duration_with_an_infinite_rate_needs_a_concurrency_limit() -> None:
    with pytest.raises(ValueError, match="--max-concurrency"):
        run(endless(), FakeBackend(), num_requests=None, duration=1.0)
    result = run(endless(), FakeBackend(delay=0.02), num_requests=None, duration=0.2, max_concurrency=2)
    assert 4 <= len(result.records) <= 25


def test_pauses_wait_between_turns() -> None:
    backend = FakeBackend(delay=0.01)
    run([chat_session(0, turns=2, pause_s=0.15)], backend)
    assert backend.sent[1][3] - backend.sent[0][3] >= 0.15


def test_stop_cancels_requests_in_flight_and_returns_what_was_measured() -> None:
    backend = FakeBackend(delay=0.05)
    runner = Runner(FakeWorkload(endless()), backend, RunConfig(num_requests=None, duration=None,
                                                                request_rate=100.0, progress=False),
                    log=lambda _: None)

    async def main():
        asyncio.get_running_loop().call_later(0.3, runner.stop, "SIGINT")
        return await runner.run()

    t0 = time.perf_counter()
    result = asyncio.run(main())
    assert time.perf_counter() - t0 < 1.0
    assert result.interrupted == "SIGINT"
    kinds = {r.error for r in result.records}
    assert None in kinds and "cancelled" in kinds and kinds <= {None, "cancelled"}


@pytest.mark.parametrize("config", [{"num_requests": 0}, {"duration": 0.0}, {"max_concurrency": 0}])
def test_settings_that_cannot_run_are_refused(config: dict) -> None:
    with pytest.raises(ValueError):
        RunConfig(**config)
