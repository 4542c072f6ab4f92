"""The supervisor's restart policy on real child processes (no model): a crash-looping child is
restarted with doubling delays and given up after `max_restarts` in a row; a child that ran
`stable_s` starts its count over; `stop` leaves the children alone."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from controlplane.procs import stop_process
from controlplane.supervisor import RestartPolicy, Supervisor


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_backoff_doubles_and_is_capped():
    policy = RestartPolicy(backoff_s=0.5, max_backoff_s=3.0)
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("settings", [{"max_restarts": -1}, {"backoff_s": 5.0, "max_backoff_s": 1.0},
                                      {"stable_s": 0.0}])
def test_bad_policy_is_refused(settings):
    with pytest.raises(ValueError):
        RestartPolicy(**settings)


def test_crash_loop_is_given_up_after_max_restarts():
    starts: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        starts.append(_child("import sys; sys.exit(3)"))
        return starts[-1]

    sup = Supervisor(RestartPolicy(max_restarts=3, backoff_s=0.01, max_backoff_s=0.05, poll_s=0.01))
    sup.add("crasher", start(), start)
    sup.start()
    try:
        _wait(lambda: sup.given_up == ["crasher"])
    finally:
        sup.stop()
    assert sup.restarts == {"crasher": 3}
    assert len(starts) == 4 and all(p.returncode == 3 for p in starts)


def test_stable_child_starts_its_count_over():
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        started.append(_child("import time; time.sleep(60)"))
        return started[-1]

    sup = Supervisor(RestartPolicy(max_restarts=1, backoff_s=0.01, stable_s=0.3, poll_s=0.01))
    sup.add("steady", start(), start)
    sup.start()
    try:
        for n in range(1, 4):  # with max_restarts=1, a second crash in a row would be given up
            _wait(lambda: len(started) == n)
            time.sleep(0.5)  # runs past stable_s
            started[-1].kill()
            _wait(lambda: sup.restarts["steady"] == n)
        assert sup.given_up == []
    finally:
        sup.stop()
    assert started[-1].poll() is None  # stop() stops supervising, not the child
    stop_process(started[-1])
