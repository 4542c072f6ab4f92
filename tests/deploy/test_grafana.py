"""The Grafana dashboards in deploy/grafana/ against a real Prometheus scraping a real cluster.

Static checks: every dashboard is standard Grafana JSON with a Prometheus datasource variable that
every panel uses. Live check: a local cluster (router + 2 workers, tiny model) is scraped by a real
Prometheus (Debian's `prometheus` package, which `make setup` installs where apt is available),
which finds the workers through the router's http_sd endpoint; after a short `kvweave loadgen`
run, every panel's PromQL is evaluated through Prometheus's HTTP API and must parse and return
data; `promtool check metrics` must pass on every scraped /metrics.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from controlplane.cluster import LocalCluster
from controlplane.procs import free_port, spawn, stop_process_groups, tail
from cli.main import main as kvweave_main

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
RATE_INTERVAL = "2m"
"""What the live test substitutes for Grafana's $__rate_interval (spans the whole loadgen run)."""


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out += panels(p) if p["type"] == "row" and p.get("panels") else ([] if p["type"] == "row" else [p])
    return out


def expressions() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) of every panel target."""
    return [(path.name, p["title"], t["expr"]) for path in DASHBOARDS for p in panels(json.loads(path.read_text()))
            for t in p["targets"]]


def test_dashboards_are_importable_grafana_json_with_a_datasource_variable() -> None:
    assert {p.name for p in DASHBOARDS} == {"cluster-overview.json", "kv-cache.json", "router.json"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids and board["title"].startswith("kvweave / ")
        uids.add(board["uid"])
        (var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
        assert var["query"] == "prometheus"
        for p in panels(board):
            assert p["datasource"] == {"type": "prometheus", "uid": "${" + var["name"] + "}"}, p["title"]
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def _overlap(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def test_panel_ids_are_unique_and_panels_neither_overlap_nor_leave_their_row() -> None:
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        top = board["panels"]
        nested = [p["panels"] for p in top if p["type"] == "row" and p.get("panels")]
        ids = [p["id"] for group in [top, *nested] for p in group]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        # A collapsed row's panels keep the places they have when it is open: each group on its own.
        for group in [top, *nested]:
            for a, b in itertools.combinations(group, 2):
                assert not _overlap(a["gridPos"], b["gridPos"]), f"{path.name}: {a['title']!r} / {b['title']!r}"
        # An open row holds the panels after it in the list: they must also lie between it and the next row.
        row_ys = [p["gridPos"]["y"] for p in top if p["type"] == "row"] + [float("inf")]
        row = -1
        for p in top:
            g = p["gridPos"]
            if p["type"] == "row":
                row += 1
                continue
            if row >= 0:
                assert row_ys[row] < g["y"] and g["y"] + g["h"] <= row_ys[row + 1], f"{path.name}: {p['title']!r}"


def test_every_metric_a_dashboard_uses_is_documented() -> None:
    documented = set(re.findall(r"`(kvweave_[a-z_]+)", (ROOT / "docs" / "metrics.md").read_text()))
    used = {re.sub(r"_(bucket|count|sum)$", "", m) for _, _, e in expressions() for m in re.findall(r"kvweave_[a-z_]+", e)}
    assert used - documented == set()


# ---------------------------------------------------------------------------------------------
# Live: real Prometheus, real cluster, real loadgen
# ---------------------------------------------------------------------------------------------

def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class Prometheus:
    def __init__(self, tmp: Path, router_http: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: kvweave-router\n    static_configs: [{{targets: ['{router_http}']}}]\n"
            "  - job_name: kvweave-workers\n"
            f"    http_sd_configs: [{{url: 'http://{router_http}/metrics/targets', refresh_interval: 1s}}]\n")
        self.log = tmp / "prometheus.log"
        self.proc = spawn(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                           f"--web.listen-address=127.0.0.1:{self.port}"], self.log)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{tail(self.log)}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready:\n{tail(self.log)}")

    def targets_up(self) -> list[dict]:
        return [t for t in _get_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"] if t["health"] == "up"]

    def query(self, expr: str) -> dict:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return _get_json(url)
        except urllib.error.HTTPError as e:  # 400 on a parse error: the body says why
            return json.loads(e.read())

    def stop(self) -> None:
        stop_process_groups([self.proc])


@pytest.fixture(scope="module")
def monitored_cluster(tiny_hf_model, tmp_path_factory):
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("prometheus/promtool not installed (Debian package `prometheus`; make setup installs it "
                    "where apt is available)")
    engine_args = {"dtype": "float32", "num_blocks": 128, "num_threads": 1, "dram_cache_gb": 0.01}
    with LocalCluster(workers=2, model=str(tiny_hf_model), engine_args=engine_args, startup_timeout=120) as cluster:
        prom = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{cluster.http_port}")
        try:
            prom.wait_ready()
            deadline = time.monotonic() + 30
            while len(prom.targets_up()) < 3:  # the router and both workers (found through http_sd)
                assert time.monotonic() < deadline, f"targets not up: {_get_json(prom.url + '/api/v1/targets')}"
                time.sleep(0.5)
            yield cluster, prom
        finally:
            prom.stop()


def _loadgen(cluster, *args: str) -> None:
    assert kvweave_main(["loadgen", "--url", cluster.grpc_target, "--token-range", "10:500", "--no-progress",
                         "--seed", "3", *args]) == 0


def test_every_dashboard_panel_returns_data_after_a_loadgen_run(monitored_cluster) -> None:
    cluster, prom = monitored_cluster
    # RAG requests with reusable chunks that recur (chunk hits), then a prefix-repetition burst
    # (prefix hits), spread over several scrapes. The RAG requests go one at a time: a chunk-cache
    # exists once its first request is computed, and on a busy machine all 16 arrived before that.
    _loadgen(cluster, "--workload", "rag", "--num-docs", "2", "--max-doc-words", "25", "--output-len", "4",
             "--popularity-skew", "2", "--shuffle-docs", "--num-requests", "16", "--request-rate", "6",
             "--max-concurrency", "1")
    _loadgen(cluster, "--workload", "prefix-repetition", "--prefix-len", "64", "--suffix-len", "8",
             "--num-prefixes", "2", "--output-len", "8", "--num-requests", "12", "--request-rate", "6")
    time.sleep(3)  # a few more scrapes after the last request
    failures = []
    for board, title, expr in expressions():
        body = prom.query(expr.replace("$__rate_interval", RATE_INTERVAL))
        if body.get("status") != "success":
            failures.append(f"{board} / {title}: {body.get('error')}\n  {expr}")
        elif not body["data"]["result"]:
            failures.append(f"{board} / {title}: no data\n  {expr}")
    assert not failures, "\n".join(failures)
    # Real values, not only series: the run's requests and its chunk reuse are visible.
    (ok,) = prom.query('sum(kvweave_router_requests_total{status="ok"})')["data"]["result"]
    assert float(ok["value"][1]) >= 28
    (hits,) = prom.query("sum(kvweave_worker_chunk_cache_hit_tokens_total)")["data"]["result"]
    assert float(hits["value"][1]) > 0


def test_promtool_accepts_every_scraped_metrics_endpoint(monitored_cluster) -> None:
    _, prom = monitored_cluster
    urls = [t["scrapeUrl"] for t in prom.targets_up()]
    assert len(urls) == 3
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read()
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert check.returncode == 0, f"{url}: {check.stdout.decode()}{check.stderr.decode()}"
