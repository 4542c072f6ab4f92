"""Helpers shared by the loadgen tests."""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def workload_sessions(*argv: str, n: int) -> list:
    """The first `n` sessions of the workload that the flags `argv` give, as `kvweave loadgen` builds it."""
    from loadgen.workloads import add_workload_arguments, build_workload

    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)  # the runner's option
    return list(itertools.islice(build_workload(parser.parse_args(list(argv))).sessions(), n))


def interrupt_loadgen(args: list[str], ready: Callable[[], bool], sig: int) -> tuple[int, str, str, float]:
    """Run `kvweave loadgen ARGS` as a subprocess, send it `sig` once `ready()` holds (within 30 s);
    (exit code, stdout, stderr, seconds from the signal to the exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", "loadgen", *args], cwd=REPO,
                            env=os.environ | {"PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run was not ready to interrupt within 30 s"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=15)
        return proc.returncode, stdout, stderr, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
