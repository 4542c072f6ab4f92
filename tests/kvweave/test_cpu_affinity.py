"""CPU core lists, binding a process (threads it already runs and those it starts later), and the
slices `kvweave serve` gives its local workers."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kvweave.cpu_affinity import CoreSlots, available_cores, format_cores, parse_cores
from worker.config import ConfigError
from worker.engine_config import EngineConfig


def test_core_lists_parse_and_format_alike():
    first = available_cores()[0]
    assert parse_cores(str(first)) == [first]
    assert format_cores([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9" and format_cores([5]) == "5"
    cores = available_cores()
    assert parse_cores(format_cores(cores)) == cores
    assert parse_cores(",".join(str(c) for c in reversed(cores))) == cores


@pytest.mark.parametrize("spec, message", [
    ("x", "bad CPU core list 'x'"), ("1-0", "bad CPU core range '1-0'"), ("-1", "bad CPU core"),
    ("0,,1", "bad CPU core list"), ("4096", "CPU cores 4096 are not available to this process (it may use "),
])
def test_bad_core_lists_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_cores(spec)
    with pytest.raises(ConfigError, match="cpu_cores: "):
        EngineConfig(cpu_cores=spec)


def test_cpu_cores_with_tensor_parallelism_is_refused():
    with pytest.raises(ConfigError, match="cpu_cores with tensor parallelism"):
        EngineConfig(cpu_cores=str(available_cores()[0]), tensor_parallel_size=2)


def test_binding_moves_running_threads_and_later_ones():
    core = available_cores()[-1]
    code = f"""
import threading, time
from kvweave.cpu_affinity import bind_process
stop = threading.Event()
early = threading.Thread(target=stop.wait); early.start()   # running before the binding
bind_process([{core}])
late = threading.Thread(target=stop.wait); late.start()     # started after it
import os
lists = set()
for tid in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{{tid}}/status") as f:
        lists.add(next(l.split()[1] for l in f if l.startswith("Cpus_allowed_list")))
stop.set()
print(len(os.listdir("/proc/self/task")), sorted(lists))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 3 and out[1:] == [f"['{core}']"]


def test_core_slots_are_disjoint_and_only_when_the_workers_fit():
    slots = CoreSlots(threads=2, num_workers=2, cores=range(6))
    assert [slots.take(), slots.take(), slots.take(), slots.take()] == [[0, 1], [2, 3], [4, 5], None]
    slots.release([2, 3])
    assert slots.take() == [2, 3]  # a removed worker's cores go to the next one added
    assert CoreSlots(threads=1, num_workers=3, cores=[0, 1]).take() is None  # 3 workers on 2 cores: none bound
    assert CoreSlots(threads=0, num_workers=2, cores=[0, 1]).take() == [0]  # at least one thread each
