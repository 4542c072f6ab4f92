"""The Grafana dashboards (deploy/helm/kvweave/dashboards/, their only copy, which the Helm chart
ships as a ConfigMap) against a real Prometheus scraping a real cluster.

Static checks: every dashboard is standard Grafana JSON with a Prometheus datasource variable that
every panel uses, its panels do not overlap, and the dashboards use every prefill/decode
disaggregation metric. Live checks: a local cluster (router + 2 workers, tiny model) is scraped by a
real Prometheus (Debian's `prometheus` package, which `make setup` installs where apt is available),
which finds the workers through the router's http_sd endpoint; after a short `kvweave loadgen`
run, every panel's PromQL is evaluated through Prometheus's HTTP API and must parse and return
data. The panels of the "Prefill/decode disaggregation" rows need prefill and decode workers: they
are evaluated on a second cluster (1 prefill + 1 decode worker), where every panel must return data
too and the handoffs must show. `promtool check metrics` must pass on every scraped /metrics.
"""
from __future__ import annotations

import contextlib
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
DASHBOARDS = sorted((ROOT / "deploy" / "helm" / "kvweave" / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__range": "10m"}
"""What the live tests substitute for Grafana's variables (windows that span the whole loadgen run)."""
DISAGG_ROW = "Prefill/decode disaggregation"
"""The rows whose panels need prefill and decode workers."""
DISAGG_METRIC = re.compile(r"disagg|handoff|remote_prefill")
"""The names of docs/metrics.md's prefill/decode disaggregation metrics."""


def panels(board: dict) -> list[tuple[str, dict]]:
    """(title of the row it belongs to, "" above the first row; panel) of every panel but the rows."""
    out, row = [], ""
    for p in board["panels"]:
        if p["type"] == "row":
            row = p["title"]
            out += [(row, q) for q in p.get("panels", [])]
        else:
            out.append((row, p))
    return out


def expressions() -> list[tuple[str, str, str, str]]:
    """(dashboard file, row title, panel title, PromQL) of every panel target."""
    return [(path.name, row, p["title"], t["expr"]) for path in DASHBOARDS
            for row, p in panels(json.loads(path.read_text())) for t in p["targets"]]


def _documented_metrics() -> set[str]:
    return set(re.findall(r"`(kvweave_[a-z_]+)", (ROOT / "docs" / "metrics.md").read_text()))


def _used_metrics() -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", m) for *_, e in expressions() for m in re.findall(r"kvweave_[a-z_]+", e)}


def test_dashboards_are_importable_grafana_json_with_a_datasource_variable() -> None:
    assert {p.name for p in DASHBOARDS} == {"cluster-overview.json", "kv-cache.json", "router.json"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids and board["title"].startswith("kvweave / ")
        uids.add(board["uid"])
        (var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
        assert var["query"] == "prometheus"
        for _, p in panels(board):
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
    assert _used_metrics() - _documented_metrics() == set()


def test_every_disaggregation_metric_is_on_a_dashboard() -> None:
    disagg = {m for m in _documented_metrics() if DISAGG_METRIC.search(m)}
    assert "kvweave_router_disagg_decisions_total" in disagg and "kvweave_worker_handoffs_total" in disagg
    assert disagg - _used_metrics() == set()


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


@contextlib.contextmanager
def _monitored(tmp: Path, model: Path, **pools: int):
    """A local cluster with these worker pools (2 workers in all), and a Prometheus scraping it."""
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("prometheus/promtool not installed (Debian package `prometheus`; make setup installs it "
                    "where apt is available)")
    engine_args = {"dtype": "float32", "num_blocks": 128, "num_threads": 1, "dram_cache_gb": 0.01}
    with LocalCluster(model=str(model), engine_args=engine_args, startup_timeout=120, **pools) as cluster:
        prom = Prometheus(tmp, f"127.0.0.1:{cluster.http_port}")
        try:
            prom.wait_ready()
            deadline = time.monotonic() + 30
            while len(prom.targets_up()) < 3:  # the router and both workers (found through http_sd)
                assert time.monotonic() < deadline, f"targets not up: {_get_json(prom.url + '/api/v1/targets')}"
                time.sleep(0.5)
            yield cluster, prom
        finally:
            prom.stop()


@pytest.fixture(scope="module")
def colocated_cluster(tiny_hf_model, tmp_path_factory):
    with _monitored(tmp_path_factory.mktemp("prometheus"), tiny_hf_model, workers=2) as monitored:
        yield monitored


@pytest.fixture(scope="module")
def disaggregated_cluster(tiny_hf_model, tmp_path_factory):
    """1 prefill + 1 decode worker, and a router (through its KVWEAVE_* environment overrides) that hands
    off every prompt over 16 uncached tokens: the tiny model computes faster than its KV moves, so
    without the margin every handoff would be "slow" (as in tests/controlplane/test_disagg_serving.py)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KVWEAVE_DISAGG_THRESHOLD_TOKENS", "16")
        env.setenv("KVWEAVE_DISAGG_HANDOFF_MARGIN", "1e6")
        with _monitored(tmp_path_factory.mktemp("prometheus"), tiny_hf_model, workers=0, prefill_workers=1,
                        decode_workers=1) as monitored:
            yield monitored


def _loadgen(cluster, *args: str) -> None:
    assert kvweave_main(["loadgen", "--url", cluster.grpc_target, "--token-range", "10:500", "--no-progress",
                         "--seed", "3", *args]) == 0


def _panels_without_data(prom: Prometheus, targets: list[tuple[str, str, str, str]]) -> list[str]:
    failures = []
    for board, _, title, expr in targets:
        query = expr
        for name, value in GRAFANA_VARIABLES.items():
            query = query.replace(name, value)
        body = prom.query(query)
        if body.get("status") != "success":
            failures.append(f"{board} / {title}: {body.get('error')}\n  {expr}")
        elif not body["data"]["result"]:
            failures.append(f"{board} / {title}: no data\n  {expr}")
    return failures


def _value(prom: Prometheus, expr: str) -> float:
    (sample,) = prom.query(expr)["data"]["result"]
    return float(sample["value"][1])


def test_every_dashboard_panel_returns_data_after_a_loadgen_run(colocated_cluster) -> None:
    cluster, prom = colocated_cluster
    # RAG requests with reusable chunks that recur (chunk hits), then a prefix-repetition burst
    # (prefix hits), spread over several scrapes. The RAG requests go one at a time: a chunk-cache
    # exists once its first request is computed, and on a busy machine all 16 arrived before that.
    # Three passages in six orders: with two, a recurring question came back in its first order half
    # the time (a prefix hit), and on some runs the router's choices left no chunk hit at all.
    _loadgen(cluster, "--workload", "rag", "--num-docs", "3", "--max-doc-words", "25", "--output-len", "4",
             "--popularity-skew", "2", "--shuffle-docs", "--num-requests", "16", "--request-rate", "6",
             "--max-concurrency", "1")
    _loadgen(cluster, "--workload", "prefix-repetition", "--prefix-len", "64", "--suffix-len", "8",
             "--num-prefixes", "2", "--output-len", "8", "--num-requests", "12", "--request-rate", "6")
    time.sleep(3)  # a few more scrapes after the last request
    # Without prefill workers, panels filtered by role have no series: those rows are checked below.
    failures = _panels_without_data(prom, [t for t in expressions() if t[1] != DISAGG_ROW])
    assert not failures, "\n".join(failures)
    # Real values, not only series: the run's requests and its chunk reuse are visible.
    assert _value(prom, 'sum(kvweave_router_requests_total{status="ok"})') >= 28
    assert _value(prom, "sum(kvweave_worker_chunk_cache_hit_tokens_total)") > 0


def test_every_dashboard_panel_returns_data_with_prefill_and_decode_workers(disaggregated_cluster) -> None:
    cluster, prom = disaggregated_cluster
    # Every prompt (72 tokens) is longer than the threshold: prefilled on prefill-0 and handed off
    # to decode-0, unless the router sees its prefix on decode-0 already (then it stays there).
    _loadgen(cluster, "--workload", "prefix-repetition", "--prefix-len", "64", "--suffix-len", "8",
             "--num-prefixes", "2", "--output-len", "8", "--num-requests", "12", "--request-rate", "6")
    time.sleep(3)  # a few more scrapes after the last request
    failures = _panels_without_data(prom, expressions())
    assert not failures, "\n".join(failures)
    # Real values: one decision per request, one result per remote prefill, every handoff made,
    # pulled and released (none expired, no block still held), its tokens served as handoff hits.
    assert _value(prom, 'sum(kvweave_router_requests_total{status="ok"})') == 12
    assert _value(prom, "sum(kvweave_router_disagg_decisions_total)") == 12
    remote = _value(prom, 'sum(kvweave_router_disagg_decisions_total{reason="remote"})')
    assert remote == _value(prom, "sum(kvweave_router_handoffs_total)")
    handed_off = _value(prom, 'sum(kvweave_router_handoffs_total{result="handed_off"})')
    assert handed_off > 0
    assert _value(prom, 'sum(kvweave_worker_requests_total{role="prefill", status="handoff"})') == handed_off
    events = {e: _value(prom, f'sum(kvweave_worker_handoffs_total{{event="{e}"}})') for e in ("created", "released",
                                                                                             "expired")}
    assert events == {"created": handed_off, "released": handed_off, "expired": 0}
    assert _value(prom, "sum(kvweave_worker_handoff_held_blocks)") == 0
    pulls = {r: _value(prom, f'sum(kvweave_worker_handoff_pulls_total{{result="{r}"}})') for r in ("complete",
                                                                                                  "partial", "failed")}
    # A decode worker that already holds every block of a handoff pulls nothing.
    assert 0 < pulls["complete"] <= handed_off and pulls["partial"] == pulls["failed"] == 0
    assert _value(prom, 'sum(kvweave_worker_handoff_bytes_total{role="decode"})') > 0
    assert _value(prom, 'sum(kvweave_worker_prefix_cache_hit_tokens_total{role="decode", source="handoff"})') > 0


@pytest.mark.parametrize("monitored", ["colocated_cluster", "disaggregated_cluster"])
def test_promtool_accepts_every_scraped_metrics_endpoint(monitored: str, request) -> None:
    _, prom = request.getfixturevalue(monitored)
    urls = [t["scrapeUrl"] for t in prom.targets_up()]
    assert len(urls) == 3
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read()
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert check.returncode == 0, f"{url}: {check.stdout.decode()}{check.stderr.decode()}"
