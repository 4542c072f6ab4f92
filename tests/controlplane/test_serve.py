"""The local launcher: `LocalCluster` and `kvweave serve` with real processes (Redis, tiny workers, router).

The module's cluster is shared by the tests in order: serving, then a worker killed with SIGKILL,
then `stop` leaving no process behind. Worker pools by role (colocated, prefill, decode) are
checked on the configuration and the commands the launcher would run, and once on a real cluster
of one prefill and one decode worker.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import kvweave
from controlplane.cluster import LocalCluster, LocalWorkers, run_sync
from controlplane.cluster_config import ENCODE_DRAM_CACHE_GB, ClusterConfig, ClusterError, worker_roles
from controlplane.procs import descendants, pid_alive

ENGINE_ARGS = {"dtype": "float32", "num_blocks": 64, "num_threads": 1}
ENGINE_FLAGS = ["--dtype", "float32", "--num-blocks", "64", "--num-threads", "1"]
LEASE_S = 2.0


@pytest.fixture(scope="module")
def cluster(tiny_hf_model):
    c = LocalCluster(workers=2, model=str(tiny_hf_model), engine_args=ENGINE_ARGS, lease_s=LEASE_S,
                     policy="round_robin", startup_timeout=120, restart=False)  # a dead worker stays dead here
    c.start()
    yield c
    c.stop()


def registered_roles(redis_url: str) -> dict[str, str]:
    """worker id -> role of every live worker in the registry."""
    import redis.asyncio as aioredis

    from kvweave.registry import Registry

    async def roles() -> dict[str, str]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return {w.worker_id: w.role for w in await Registry(client).list_workers()}
        finally:
            await client.aclose()

    return run_sync(roles())


def registered_ids(redis_url: str) -> set[str]:
    return set(registered_roles(redis_url))


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_cluster_serves_grpc_and_http_on_both_workers(cluster) -> None:
    assert registered_ids(cluster.redis_url) == set(cluster.worker_ids)
    assert sorted(cluster.worker_addresses) == sorted(cluster.worker_ids)
    with kvweave.Client(cluster.grpc_target, timeout=60) as client:
        served_by = {client.complete("Hello", max_tokens=3, ignore_eos=True).worker_id for _ in range(4)}
    assert served_by == set(cluster.worker_ids)  # round_robin
    body = post_json(f"{cluster.http_url}/v1/completions",
                     {"model": cluster.config.model, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    urls = cluster.metrics_urls  # the router's and every worker's, each answering
    assert sorted(urls) == sorted(["router", *cluster.worker_ids])
    for name, url in urls.items():
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and (b"kvweave_router_" if name == "router" else b"kvweave_worker_") in resp.read()
    with urllib.request.urlopen(f"{cluster.http_url}/metrics/targets", timeout=10) as resp:
        targets = {g["labels"]["worker"]: g["targets"][0] for g in json.loads(resp.read())}
    assert {w: f"http://{t}/metrics" for w, t in targets.items()} == {w: urls[w] for w in cluster.worker_ids}


def test_workers_run_with_tcmalloc_preloaded_where_it_is_installed(cluster) -> None:
    """`make setup` installs Debian's libtcmalloc-minimal4; the cluster preloads it into its workers."""
    import glob

    from controlplane.procs import TCMALLOC_GLOBS

    if not any(glob.glob(p) for p in TCMALLOC_GLOBS):
        pytest.skip("tcmalloc is not installed here (make setup installs it where apt is available)")
    for proc in cluster.workers.procs:
        with open(f"/proc/{proc.pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert b"libtcmalloc" in env[b"LD_PRELOAD"]
        with open(f"/proc/{proc.pid}/maps") as f:
            assert "libtcmalloc" in f.read()  # really loaded, not just named


def test_each_worker_runs_on_its_own_cores(cluster) -> None:
    """One thread each (ENGINE_ARGS): with two cores or more, each worker process, every thread of it,
    runs on a core of its own; the scheduler keeps moving neither onto the other's core."""
    from kvweave.cpu_affinity import available_cores, parse_cores

    if len(available_cores()) < 2:
        assert cluster.workers.cores == {}  # the two do not fit: left to the scheduler
        return
    seen = []
    for worker_id, proc in zip(cluster.workers.worker_ids, cluster.workers.procs):
        lists = set()
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{tid}/status") as f:
                lists.add(next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list")))
        assert len(lists) == 1 and parse_cores(lists.pop()) == cluster.workers.cores[worker_id]
        seen.append(cluster.workers.cores[worker_id])
    assert all(len(c) == 1 for c in seen) and seen[0] != seen[1]


def test_sigkilled_worker_leaves_the_registry_and_the_cluster_keeps_serving(cluster) -> None:
    victim_id, survivor_id = cluster.worker_ids
    victim = cluster.workers.procs[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    deadline = time.monotonic() + 3 * LEASE_S  # the lease, with room for a loaded machine
    while victim_id in registered_ids(cluster.redis_url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert registered_ids(cluster.redis_url) == {survivor_id}
    assert f"worker {victim_id} exited" in cluster.check()
    with kvweave.Client(cluster.grpc_target, timeout=60) as client:
        for _ in range(3):
            completion = client.complete("Hello", max_tokens=3, ignore_eos=True)
            assert (completion.worker_id, completion.finish_reason) == (survivor_id, "length")


def test_stop_leaves_no_process_behind(cluster) -> None:
    pids = cluster.pids()
    assert len(pids) == 4  # redis, router, 2 workers (one already dead)
    tree = set(pids).union(*(descendants(p) for p in pids))
    cluster.stop()
    assert not [p for p in tree if pid_alive(p)]


def test_startup_failure_names_the_worker_and_cleans_up(tiny_hf_model) -> None:
    before = descendants(os.getpid())
    with pytest.raises(ClusterError, match=r"(?s)worker worker-0 exited with 2.*unknown dtype 'float7'"):
        LocalCluster(workers=1, model=str(tiny_hf_model), engine_args=ENGINE_ARGS | {"dtype": "float7"}).start()
    assert descendants(os.getpid()) <= before


@contextlib.contextmanager
def squatting(port: int = 0):
    """A socket listening on 127.0.0.1:`port` (0: a free one) for the block; yields its port."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        yield squatter.getsockname()[1]
    finally:
        squatter.close()


def start_and_ask_models(cluster: LocalCluster) -> None:
    """Start `cluster`, check its router answers /v1/models, stop it."""
    cluster.start()
    try:
        with urllib.request.urlopen(f"{cluster.http_url}/v1/models", timeout=30) as resp:
            assert json.load(resp)["data"][0]["id"]
    finally:
        cluster.stop()


def test_a_router_whose_picked_port_was_taken_starts_on_other_ports(tiny_hf_model) -> None:
    """Another process (Ray's, in the wild) binds the port the cluster picked for its router before the
    router does: the cluster starts the router again on fresh ports instead of failing."""
    cluster = LocalCluster(workers=1, model=str(tiny_hf_model), engine_args=ENGINE_ARGS, insecure=True)
    taken = cluster.http_port
    with squatting(taken):
        start_and_ask_models(cluster)
        assert cluster.http_port != taken
    given = LocalCluster(workers=1, model=str(tiny_hf_model), engine_args=ENGINE_ARGS, insecure=True, http_port=taken)
    with squatting(taken):  # a port the user chose is not swapped for another
        with pytest.raises(ClusterError, match="address already in use"):
            given.start()


def test_a_worker_whose_picked_port_was_taken_starts_on_other_ports(tiny_hf_model, monkeypatch) -> None:
    """As for the router: another process binds the port picked for a worker before the worker does
    (the CI failure), and the cluster starts that worker again on fresh ports."""
    import controlplane.cluster as cluster_module

    cluster = LocalCluster(workers=1, model=str(tiny_hf_model), engine_args=ENGINE_ARGS, insecure=True)
    ports = []
    real_rebind = LocalWorkers.rebind

    def rebind(workers, worker_id):  # the worker's ports when it failed, then after the rebind
        ports.append(workers._ports[worker_id][0])
        real_rebind(workers, worker_id)
        ports.append(workers._ports[worker_id][0])

    monkeypatch.setattr(LocalWorkers, "rebind", rebind)
    with squatting() as taken:
        picks = iter([taken])
        real_free_port = cluster_module.free_port
        monkeypatch.setattr(cluster_module, "free_port", lambda *a: next(picks, None) or real_free_port(*a))
        start_and_ask_models(cluster)  # the worker's first gRPC port is the squatter's
    assert cluster._worker_rebinds == 1 and ports[0] == taken and ports[1] != taken


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def wait_for_line(lines: queue.Queue, prefix: str, proc: subprocess.Popen, timeout: float = 120.0) -> list[str]:
    """Lines read until one starting with `prefix` (inclusive)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, f"kvweave serve exited with {proc.returncode}: {seen}"
            continue
        seen.append(line.rstrip("\n"))
        if line.strip().startswith(prefix):
            return seen
    raise AssertionError(f"no {prefix!r} line within {timeout} s: {seen}")


def test_serve_command_prints_endpoints_and_stops_cleanly_on_sigterm(tiny_hf_model) -> None:
    cmd = [sys.executable, "-m", "cli", "serve", "--workers", "1", "--model", str(tiny_hf_model),
           "--port", "0", "--http-port", "0", *ENGINE_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        out = wait_for_line(lines, "logs", proc)
        assert out[0].startswith("kvweave cluster ready: 1 worker")
        endpoints = dict(line.split(None, 1) for line in out[1:])
        assert endpoints["http"].startswith("http://127.0.0.1:") and endpoints["redis"].startswith("redis://")
        assert endpoints["worker"].startswith("worker-0 127.0.0.1:")
        metrics = dict(line.split()[1:] for line in out[1:] if line.startswith("  metrics "))
        assert sorted(metrics) == ["router", "worker-0"]
        assert all(url.startswith("http://127.0.0.1:") and url.endswith("/metrics") for url in metrics.values())
        children = descendants(proc.pid)
        assert len(children) >= 3  # redis, router, worker
        with kvweave.Client(endpoints["grpc"], timeout=60) as client:
            assert client.complete("Hello", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert not [p for p in children if pid_alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_passes_peer_fetch_to_its_workers(tmp_path) -> None:
    from cli.main import build_parser
    from cli.serve import config_from_args

    parser = build_parser("all")
    for flag, expected in ((["--peer-fetch", "false"], False), ([], True)):
        config = config_from_args(parser.parse_args(["serve", "--workers", "2", *flag]))
        assert config.peer_fetch is expected
        workers = LocalWorkers(config, {"w0": "colocated"}, "redis://127.0.0.1:1/0", tmp_path, {})
        command = workers._command("w0", 1234, 1235)
        worker_args = parser.parse_args(command[command.index("cli") + 1:])
        assert worker_args.command == "worker" and worker_args.peer_fetch is expected


@pytest.mark.parametrize("counts, message", [
    ({"workers": 0}, "at least one worker"),
    ({"workers": -1, "decode_workers": 1}, "worker counts must be >= 0, got workers=-1"),
    ({"workers": 1, "prefill_workers": -1}, "got prefill_workers=-1"),
    ({"workers": 0, "prefill_workers": 2}, "prefill_workers=2 without a decode or colocated worker"),
    ({"workers": 0, "encode_workers": 1}, "encode_workers=1 without a decode or colocated worker"),
    ({"workers": 1, "encode_workers": -1}, "got encode_workers=-1"),
])
def test_bad_worker_pools_are_config_errors(counts, message) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**counts)


def test_decode_workers_alone_and_mixed_pools_are_valid() -> None:
    assert ClusterConfig(workers=0, decode_workers=2).role_counts == {"decode": 2}
    mixed = ClusterConfig(workers=1, prefill_workers=1, decode_workers=1)
    assert (mixed.role_counts, mixed.num_workers) == ({"colocated": 1, "prefill": 1, "decode": 1}, 3)


def test_serve_exits_with_the_pool_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "serve", "--prefill-workers", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "error: prefill_workers=1 without a decode or colocated worker" in proc.stderr


def test_serve_starts_no_colocated_worker_beside_pools_unless_asked(monkeypatch, capsys) -> None:
    from cli.main import build_parser
    from cli.serve import config_from_args

    parser = build_parser("all")
    for argv, expected in (("", (1, 0, 0)),
                           ("--prefill-workers 1 --decode-workers 1", (0, 1, 1)),
                           ("--decode-workers 2", (0, 0, 2)),
                           ("--workers 1 --prefill-workers 1 --decode-workers 1", (1, 1, 1))):
        config = config_from_args(parser.parse_args(["serve", *argv.split()]))
        assert (config.workers, config.prefill_workers, config.decode_workers) == expected, argv
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help at hyphens too
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--workers N Number of colocated workers" in help_text
    assert "(default: 1, or 0 with --prefill-workers or --decode-workers; env KVWEAVE_WORKERS)" in help_text


def test_worker_ids_and_role_flags_per_role(tmp_path) -> None:
    from cli.main import build_parser

    config = ClusterConfig(workers=1, prefill_workers=2, decode_workers=1)
    roles = worker_roles(config)
    assert roles == {"worker-0": "colocated", "prefill-0": "prefill", "prefill-1": "prefill", "decode-0": "decode"}
    workers, parser = LocalWorkers(config, roles, "redis://127.0.0.1:1/0", tmp_path, {}), build_parser("all")
    for worker_id, role in roles.items():
        command = workers._command(worker_id, 1234, 1235)
        args = parser.parse_args(command[command.index("cli") + 1:])
        assert (args.command, args.worker_id, args.role) == ("worker", worker_id, role)
    shared = worker_roles(ClusterConfig(workers=1, decode_workers=1, redis_url="redis://127.0.0.1:1/0"))
    assert sorted(shared.values()) == ["colocated", "decode"]  # a random suffix: other clusters share the Redis
    assert {i.rsplit("-", 1)[0]: r for i, r in shared.items()} == {"worker-0": "colocated", "decode-0": "decode"}


def test_encode_workers_get_their_role_and_a_host_tier(tmp_path) -> None:
    from cli.main import build_parser
    from cli.serve import config_from_args, describe_pools

    parser = build_parser("all")
    config = config_from_args(parser.parse_args(["serve", "--encode-workers", "2"]))
    assert config.role_counts == {"colocated": 1, "encode": 2} and config.num_workers == 3
    assert describe_pools(config) == "1 colocated + 2 encode worker(s)"
    roles = worker_roles(config)
    assert roles == {"worker-0": "colocated", "encode-0": "encode", "encode-1": "encode"}
    workers = LocalWorkers(config, roles, "redis://127.0.0.1:1/0", tmp_path, {})
    for worker_id, role, dram in (("worker-0", "colocated", None), ("encode-1", "encode", ENCODE_DRAM_CACHE_GB)):
        command = workers._command(worker_id, 1234, 1235)
        args = parser.parse_args(command[command.index("cli") + 1:])
        assert (args.role, args.dram_cache_gb) == (role, dram)
    given = config_from_args(parser.parse_args(["serve", "--encode-workers", "1", "--dram-cache-gb", "0.5"]))
    command = LocalWorkers(given, {"encode-0": "encode"}, "redis://127.0.0.1:1/0", tmp_path, {})._command(
        "encode-0", 1234, 1235)
    assert parser.parse_args(command[command.index("cli") + 1:]).dram_cache_gb == 0.5


def test_prefill_and_decode_pools_register_their_roles(tiny_hf_model) -> None:
    from cli.serve import format_endpoints

    with LocalCluster(workers=0, prefill_workers=1, decode_workers=1, model=str(tiny_hf_model),
                      engine_args=ENGINE_ARGS, startup_timeout=120) as cluster:
        assert registered_roles(cluster.redis_url) == {"prefill-0": "prefill", "decode-0": "decode"}
        assert cluster.worker_roles == {"prefill-0": "prefill", "decode-0": "decode"}
        lines = format_endpoints(cluster).splitlines()
    assert lines[0] == f"kvweave cluster ready: 1 prefill + 1 decode worker(s) (local), model {tiny_hf_model}"
    workers = [line.split()[1:] for line in lines if line.startswith("  worker ")]
    assert [(w[0], w[2]) for w in workers] == [("prefill-0", "prefill"), ("decode-0", "decode")]


def test_with_tcmalloc_keeps_other_preloads_and_can_be_turned_off(monkeypatch, tmp_path) -> None:
    from controlplane import procs

    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setattr(procs, "TCMALLOC_GLOBS", (str(lib),))
    assert procs.with_tcmalloc({"A": "1"})["LD_PRELOAD"] == str(lib)
    assert procs.with_tcmalloc({"LD_PRELOAD": "/x.so"})["LD_PRELOAD"] == f"{lib}:/x.so"
    assert procs.with_tcmalloc({"LD_PRELOAD": "/y/libtcmalloc.so"}) == {"LD_PRELOAD": "/y/libtcmalloc.so"}
    assert procs.with_tcmalloc({"KVWEAVE_TCMALLOC": "0"}) == {"KVWEAVE_TCMALLOC": "0"}
    monkeypatch.setattr(procs, "TCMALLOC_GLOBS", (str(tmp_path / "missing.so"),))
    assert procs.with_tcmalloc({"A": "1"}) == {"A": "1"}
