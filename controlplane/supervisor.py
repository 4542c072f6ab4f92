"""Restart the children of an embedded cluster (workers, the router, the private redis-server) when they die.

Each supervised child is a name and a `start` callable that (re)starts it and returns its
`subprocess.Popen`. A background thread polls them every `poll_s`; a child found dead is started
again after a backoff that doubles with each consecutive crash (`backoff_s`, 2x, 4x ... capped at
`max_backoff_s`) and resets once the child has run `stable_s` without dying, as systemd's and
Kubernetes' crash-loop backoffs do. A child that crashes more than `max_restarts` times in a row
(without a stable run between) is given up: logged as an error and reported by `given_up`.
Every restart is logged and counted (`restarts`).

The children keep their identity across restarts because `start` reuses the same command line:
a worker keeps its id and ports, so the router's channel to it reconnects and the cluster heals.
"""
from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class RestartPolicy:
    """When and how often to restart (ClusterConfig's `restart*` fields build it)."""

    enabled: bool = True
    """Restart a worker process, the router or the embedded redis-server that dies."""
    max_restarts: int = 10
    """Consecutive restarts of one process (without `stable_s` of uptime between) before giving up
    on it; 0: never give up."""
    backoff_s: float = 0.5
    """Delay before the first restart of a process; it doubles with each consecutive crash."""
    max_backoff_s: float = 30.0
    """Longest delay between restarts."""
    stable_s: float = 30.0
    """Uptime after which a process counts as stable again (its backoff and count reset)."""
    poll_s: float = 0.2
    """How often the supervisor checks the processes."""

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError("restart backoff must satisfy 0 <= backoff_s <= max_backoff_s")
        if self.stable_s <= 0 or self.poll_s <= 0:
            raise ValueError("stable_s and poll_s must be positive")

    def delay(self, num_consecutive: int) -> float:
        """Seconds to wait before the restart that follows `num_consecutive` earlier crashes in a row."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** min(num_consecutive, 30))


@dataclass
class _Child:
    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen
    started_at: float
    num_consecutive: int = 0
    restart_at: float | None = None
    """When a dead child is due to start again (None: running, or given up)."""
    given_up: bool = False


class Supervisor:
    """Polls the children in a daemon thread and restarts the dead ones per `policy`."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.restarts: dict[str, int] = {}
        """Restarts so far, per child name."""
        self._children: dict[str, _Child] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, proc: subprocess.Popen, start: Callable[[], subprocess.Popen]) -> None:
        """Supervise `proc`; `start()` starts a replacement (with the same identity) and returns it."""
        with self._lock:
            self._children[name] = _Child(name, start, proc, time.monotonic())
            self.restarts.setdefault(name, 0)

    def remove(self, name: str) -> None:
        """Stop supervising `name` (a worker about to be stopped on purpose); once this returns, it is
        neither checked nor restarted again."""
        with self._lock:
            self._children.pop(name, None)

    def start(self) -> None:
        if self.policy.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvweave-supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop supervising (the children keep running); waits for a restart in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def supervised(self) -> list[str]:
        """The names of the children supervised now."""
        with self._lock:
            return list(self._children)

    @property
    def given_up(self) -> list[str]:
        """Children that crashed more than `max_restarts` times in a row and stay down."""
        with self._lock:
            return [c.name for c in self._children.values() if c.given_up]

    def _run(self) -> None:
        while not self._stop.wait(self.policy.poll_s):
            with self._lock:
                children = list(self._children.values())
            for child in children:
                if self._stop.is_set():
                    return
                with self._lock:  # `remove` waits for a check in progress
                    if self._children.get(child.name) is not child:
                        continue
                    try:
                        self.poll(child)
                    except Exception:  # a failed start is retried with backoff, never ends supervision
                        logger.exception("supervisor: restarting %s failed", child.name)
                        child.restart_at = time.monotonic() + self.policy.delay(child.num_consecutive)

    def poll(self, child: _Child) -> None:
        """One check of one child: note a death (schedule its restart), or restart it when due."""
        now = time.monotonic()
        if child.given_up:
            return
        if child.restart_at is None:
            if child.proc.poll() is None:
                if child.num_consecutive and now - child.started_at >= self.policy.stable_s:
                    child.num_consecutive = 0  # ran stably: the next crash starts the backoff over
                return
            self._schedule(child, now)
            return
        if now >= child.restart_at:
            child.restart_at = None
            child.proc, child.started_at = child.start(), time.monotonic()
            self.restarts[child.name] += 1
            logger.warning("supervisor: restarted %s (pid %d; restart %d, %d in a row)", child.name,
                           child.proc.pid, self.restarts[child.name], child.num_consecutive)

    def _schedule(self, child: _Child, now: float) -> None:
        p = self.policy
        if now - child.started_at >= p.stable_s:
            child.num_consecutive = 0
        if p.max_restarts and child.num_consecutive >= p.max_restarts:
            child.given_up = True
            logger.error("supervisor: %s exited with %s after %d restarts in a row; giving up on it",
                         child.name, child.proc.returncode, child.num_consecutive)
            return
        delay = p.delay(child.num_consecutive)
        child.num_consecutive += 1
        child.restart_at = now + delay
        logger.warning("supervisor: %s (pid %d) exited with %s; restarting it in %.1f s", child.name,
                       child.proc.pid, child.proc.returncode, delay)
