"""The run: sessions start when the arrival process (or the trace) says, each session's turns go one
after the other, and every request is measured by the backend.

- Arrivals: trace timestamps (`Session.arrival_s`) when the sessions carry them and no request rate
  was given; else the arrival process (`request_rate`, `burstiness`; infinite: all at once).
- `max_concurrency` bounds the requests in flight; with an infinite rate it also bounds the sessions
  in flight (a closed loop of C users), so an endless workload does not start endless sessions.
- Stop: after `num_requests` requests (turns; the turns of a session that failed are given back to
  other sessions), or once `duration` seconds have passed (no request is sent after that; those in
  flight are awaited), or when the workload runs out of sessions.
- `stop()` (SIGINT / SIGTERM while `run` runs in the main thread) stops sending, cancels the
  requests in flight (recorded as error kind "cancelled") and returns what was measured.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from kvweave.config_flags import bounded, flag
from loadgen.arrivals import ArrivalProcess, parse_burstiness, parse_rate
from loadgen.backends import Backend
from loadgen.records import CANCELLED, RequestRecord
from loadgen.types import Session, Workload

PROGRESS_TICK_S = 0.5


DEFAULT_NUM_REQUESTS = 100


@dataclass(frozen=True)
class RunConfig:
    """How much load and for how long (the `load` flags of `kvweave loadgen`). None means: for
    `request_rate`, the sessions' trace timestamps where they have them, else infinite; for
    `num_requests`, no limit (then `duration` or the workload's end stops the run)."""

    request_rate: float | None = field(default=None, metadata=flag(
        parse=parse_rate, metavar="R", default_text="the trace's timestamps for mooncake and azure, else inf"))
    """sessions started per second, Poisson (gamma with --burstiness); 'inf' starts all at once"""
    burstiness: float = field(default=1.0, metadata=flag(parse=parse_burstiness, metavar="B"))
    """gamma shape of the inter-arrival times: 1 is Poisson, < 1 burstier, > 1 smoother"""
    max_concurrency: int | None = field(default=None, metadata=flag(parse=bounded(int, 1), metavar="C",
                                                                    default_text="no limit"))
    """most requests in flight; with an infinite rate also the most sessions in flight"""
    num_requests: int | None = field(default=DEFAULT_NUM_REQUESTS, metadata=flag(
        parse=bounded(int, 1), metavar="N", default_text=f"{DEFAULT_NUM_REQUESTS}, or no limit with --duration"))
    """requests to send (a multi-turn session's turns count one each)"""
    duration: float | None = field(default=None, metadata=flag(parse=bounded(float, 0, strict=True), metavar="S",
                                                               default_text=""))
    """send no new request after S seconds, then wait for those in flight"""
    seed: int = field(default=0, metadata=flag(parse=bounded(int, 0)))
    """seed of the workload and the arrivals"""
    progress: bool = field(default=True, metadata=flag(name="--no-progress", action="store_false", default_text=""))
    """show a progress bar; --no-progress hides it"""

    def __post_init__(self) -> None:
        """Raises ValueError for settings that cannot run, naming the flag."""
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if not (math.isfinite(self.burstiness) and self.burstiness > 0):
            raise ValueError(f"--burstiness must be a finite number > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"--num-requests must be >= 1, got {self.num_requests}")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"--duration must be a finite number of seconds > 0, got {self.duration}")
        if self.seed < 0:
            raise ValueError(f"--seed must be at least 0, got {self.seed}")


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    """In the order the requests were sent."""
    start: float
    """perf_counter at the start of the run."""
    duration: float
    """Seconds from the start until every request had ended (or was cancelled)."""
    arrivals: str
    """How sessions arrived (for reports)."""
    interrupted: str | None = None
    """The signal that stopped the run, if one did."""


class Runner:
    """Drives one workload against one backend (`await Runner(...).run()`, once)."""

    def __init__(self, workload: Workload, backend: Backend, config: RunConfig,
                 log: Callable[[str], None] = print) -> None:
        self.workload, self.backend, self.config, self.log = workload, backend, config, log
        self.records: list[RequestRecord] = []
        self.interrupted: str | None = None
        self._left = config.num_requests  # requests not yet reserved by a session (None: no limit)
        self._tasks: set[asyncio.Task] = set()
        self._active = 0  # sessions started and not finished (a finished task may still be in _tasks)
        self._deadline: float | None = None
        self._stop, self._wake = asyncio.Event(), asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        self.start = 0.0

    def stop(self, reason: str = "stopped") -> None:
        """Stop sending and cancel the requests in flight; `run` then returns what it measured."""
        if self.interrupted is None:
            self.interrupted = reason
            self._stop.set()

    async def run(self) -> RunResult:
        c = self.config
        sessions = iter(self.workload.sessions())
        first = next(sessions, None)
        trace = first is not None and first.arrival_s is not None and c.request_rate is None
        rate = math.inf if c.request_rate is None else c.request_rate
        process = ArrivalProcess(rate, c.burstiness, c.seed)
        if not trace and math.isinf(rate) and c.duration and c.num_requests is None and not c.max_concurrency:
            raise ValueError("--duration with an infinite --request-rate needs --max-concurrency (or a finite "
                             "--request-rate); otherwise sessions would start without end")
        closed_loop = not trace and math.isinf(rate) and c.max_concurrency is not None
        self._session_slots = asyncio.Semaphore(c.max_concurrency) if closed_loop else None
        arrivals = "trace timestamps" if trace else process.describe()
        self.log(f"arrivals: {arrivals}; max concurrency: {c.max_concurrency or 'unlimited'}; "
                 f"stop after {self._stop_condition()}")
        self._progress = tqdm(total=c.num_requests or c.duration, unit="req" if c.num_requests else "s",
                              disable=not c.progress, dynamic_ncols=True, leave=False,
                              bar_format=None if c.num_requests else "{l_bar}{bar}| {n:.1f}/{total:g} s{postfix}")
        handlers = self._install_signal_handlers()
        self.start = time.perf_counter()
        self._deadline = None if c.duration is None else self.start + c.duration
        ticker = None if c.num_requests else asyncio.create_task(self._tick())
        try:
            if first is not None:
                await self._launch(first, sessions, trace, process.gaps())
            await self._finish()
        finally:
            end = time.perf_counter()
            if ticker is not None:
                ticker.cancel()
            for sig in handlers:
                asyncio.get_running_loop().remove_signal_handler(sig)
            self._progress.close()
        self.records.sort(key=lambda r: r.start)
        return RunResult(self.records, self.start, end - self.start, arrivals, self.interrupted)

    def _stop_condition(self) -> str:
        c = self.config
        parts = ([f"{c.num_requests} requests"] if c.num_requests else []) + \
                ([f"{c.duration:g} s"] if c.duration else [])
        return " or ".join(parts) + " (or when the workload ends)" if parts else "the workload ends"

    def _install_signal_handlers(self) -> list[int]:
        """SIGINT / SIGTERM call `stop` (only possible in the main thread; elsewhere none is installed)."""
        loop, installed = asyncio.get_running_loop(), []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
            except (RuntimeError, ValueError, NotImplementedError):
                break
            installed.append(sig)
        return installed

    # ------------------------------------------------------------------------------ launching

    def _stopping(self) -> bool:
        return self._stop.is_set() or (self._deadline is not None and time.perf_counter() >= self._deadline)

    async def _wait(self, until: float | None = None, event: asyncio.Event | None = None,
                    to_deadline: bool = True) -> None:
        """Until the perf_counter time `until`, `event` is set, a stop, or (`to_deadline`) the duration's end."""
        ends = [t for t in (until, self._deadline if to_deadline else None) if t is not None]
        timeout = max(0.0, min(ends) - time.perf_counter()) if ends else None
        waiters = [asyncio.ensure_future(e.wait()) for e in (self._stop, event) if e is not None]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _launch(self, session: Session | None, sessions: Iterator[Session], trace: bool,
                      gaps: Iterator[float]) -> None:
        offset = 0.0  # arrival time of the next session from the arrival process
        while session is not None and not self._stopping():
            at = (session.arrival_s or 0.0) if trace else offset
            if not trace:
                offset += next(gaps)
            if self.start + at > time.perf_counter():
                await self._wait(until=self.start + at)
                if self._stopping():
                    return
            reserved = await self._reserve(len(session.turns))
            if not reserved:
                return
            if self._session_slots is not None:
                await self._session_slots.acquire()
                if self._stopping():
                    self._session_slots.release()
                    return
            self._active += 1
            task = asyncio.create_task(self._run_session(session, reserved))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            session = next(sessions, None)

    async def _reserve(self, turns: int) -> int:
        """Take up to `turns` requests from what is left to send; 0 when the run must stop launching
        (nothing left, and no session in flight that could give requests back)."""
        while self._left is not None and self._left == 0:
            if not self._active or self._stopping():
                return 0
            self._wake.clear()
            await self._wait(event=self._wake)
        if self._stopping():
            return 0
        take = turns if self._left is None else min(turns, self._left)
        if self._left is not None:
            self._left -= take
        return take

    async def _finish(self) -> None:
        """Await the sessions in flight; on a stop, cancel them."""
        tasks = set(self._tasks)  # launching is over: no session starts any more
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            while tasks and not self._stop.is_set():
                _, tasks = await asyncio.wait(tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                tasks.discard(stopper)
        finally:
            stopper.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _tick(self) -> None:
        """Advance a duration-based progress bar."""
        while True:
            await asyncio.sleep(PROGRESS_TICK_S)
            elapsed = min(time.perf_counter() - self.start, self.config.duration)
            self._progress.update(elapsed - self._progress.n)
            self._progress.set_postfix(requests=len(self.records), refresh=False)

    # ------------------------------------------------------------------------------ sessions

    async def _run_session(self, session: Session, reserved: int) -> None:
        history: list[dict] = []
        sent, sending = 0, None
        try:
            for i, turn in enumerate(session.turns[:reserved]):
                if i > 0 and turn.pause_s > 0:
                    await self._wait(until=time.perf_counter() + turn.pause_s)
                async with self._slots or contextlib.nullcontext():
                    if self._stopping():
                        break
                    sending = time.perf_counter()
                    record = await self.backend.send(turn, history, session.session_id)
                    sending = None
                record.tags = session.tags
                sent += 1
                self._add(record)
                if not record.ok:
                    break  # a conversation cannot go on without the reply
                if turn.messages is not None:
                    history += [*turn.messages, {"role": "assistant", "content": record.text}]
        except asyncio.CancelledError:
            if sending is not None:
                record = RequestRecord(start=sending, session_id=session.session_id, tags=session.tags,
                                       prompt_tokens=len(turn.token_ids or ()), latency=time.perf_counter() - sending)
                self._add(record.fail(CANCELLED, "still in flight when the run was stopped"
                                   + (f" by {self.interrupted}" if self.interrupted else "")))
        finally:
            self._active -= 1
            if self._left is not None:
                self._left += reserved - sent
            if self._session_slots is not None:
                self._session_slots.release()
            self._wake.set()

    def _add(self, record: RequestRecord) -> None:
        self.records.append(record)
        if self.config.num_requests:
            self._progress.update(1)
