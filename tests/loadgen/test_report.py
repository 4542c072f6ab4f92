"""Reports: the summary table, the JSON file, `kvweave loadgen compare` and the PNG plots."""
from __future__ import annotations

import json

import pytest

from cli.main import main
from loadgen.plots import write_plots
from loadgen.records import RequestRecord
from loadgen.report import ReportError, build_result, format_comparison, format_summary, load_result, write_json
from loadgen.stats import compute_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result(ttft_ms: float, label: str | None = None, failures: int = 0, goodput: dict | None = None,
                n: int = 20) -> dict:
    """A result as `kvweave loadgen --json` writes it, from `n` requests with a TTFT around `ttft_ms`."""
    records = [RequestRecord(start=0.1 * i, ttft=(ttft_ms + i) / 1000, latency=(ttft_ms + i + 90) / 1000,
                             itls=[0.01] * 9, output_tokens=10, prompt_tokens=50, cached_tokens=20,
                             chunk_reused_tokens=10, recomputed_tokens=1) for i in range(n)]
    records += [RequestRecord(start=0.05).fail("http_500", "boom") for _ in range(failures)]
    stats = compute_stats(records, start=0.0, duration=2.0 + ttft_ms / 1000, goodput=goodput)
    return build_result(stats, label=label, backend="grpc", model="tiny", num_requests=n + failures,
                        request_rate=float("inf"), burstiness=1.0, max_concurrency=4, arrivals="all at once",
                        interrupted=None, config={"workload": "random"})


def test_summary_has_vllm_lines_reuse_and_errors() -> None:
    text = format_summary(make_result(100, label="baseline", failures=2, goodput={"ttft": 110}))
    assert text.splitlines()[0] == "============ Serving Benchmark Result ============"
    for line in ("Run:", "Successful requests:                     20", "Failed requests:                         2",
                 "Maximum request concurrency:", "Request goodput (req/s):", "Mean TTFT (ms):", "P99 TTFT (ms):",
                 "Median TPOT (ms):", "P90 ITL (ms):", "Mean E2EL (ms):", "Prefix-cached tokens:",
                 "200 (20.0% of input)", "Recomputed tokens:", "http_500:                                2"):
        assert line in text, line
    plain = format_summary(make_result(100))
    assert "Request goodput" not in plain and "Errors" not in plain and "Run:" not in plain


def disaggregated_result() -> dict:
    """A result of 3 remote-prefilled long requests (TTFT 500-502 ms) and 6 short local ones."""
    records = [RequestRecord(start=0.1 * i, ttft=(502 - i) / 1000, latency=0.6, itls=[0.02], output_tokens=2,
                             prompt_tokens=5000, worker_id=f"d{i % 2}", disaggregation="remote",
                             prefill_worker_id="p0", tags={"class": "long"}) for i in range(3)]
    records += [RequestRecord(start=0.1 * i, ttft=0.01, latency=0.5, itls=[0.01] * 3, output_tokens=4,
                              prompt_tokens=50, worker_id="d0", disaggregation="short", tags={"class": "short"})
                for i in range(6)]
    stats = compute_stats(records, start=0.0, duration=2.0)
    return build_result(stats, label=None, backend="grpc", model="tiny", num_requests=9, request_rate=2.0,
                        burstiness=1.0, max_concurrency=None, arrivals="poisson", interrupted=None, config={})


def test_summary_with_disaggregation_and_classes() -> None:
    lines = format_summary(disaggregated_result()).splitlines()
    at = {line: i for i, line in enumerate(lines)}
    headings = ["-------------Prefill/decode decisions-------------",
                "-----------Prefill remote (3 requests)------------",
                "------------Prefill local (6 requests)------------",
                "------Successful requests per prefill worker------",
                "------Successful requests per decode worker-------",
                "-------------Class long (3 requests)--------------",
                "-------------Class short (6 requests)-------------"]
    assert [at[h] for h in headings] == sorted(at[h] for h in headings)  # in this order
    assert "short:                                   6         " in lines
    assert lines[at[headings[0]] + 1:at[headings[1]]] == [
        "short:                                   6         ", "remote:                                  3         "]
    remote = lines[at[headings[1]] + 1:at[headings[2]]]
    assert [line.split(":")[0] for line in remote] == [
        f"{s} {m} (ms)" for m in ("TTFT", "TPOT", "ITL", "E2EL") for s in ("Mean", "Median", "P50", "P90", "P99")]
    assert remote[0] == "Mean TTFT (ms):                          501.00    "
    assert lines[at[headings[3]] + 1] == "p0:                                      3         "
    assert lines[at[headings[4]] + 1:at[headings[5]]] == ["d0:                                      8         ",
                                                         "d1:                                      1         "]
    assert "Successful requests per worker" not in "\n".join(lines)


def test_summary_without_disaggregation_has_no_new_sections() -> None:
    text = format_summary(make_result(100))
    for absent in ("Prefill", "decode", "Class", "Images"):
        assert absent not in text, absent


def test_summary_counts_images() -> None:
    records = [RequestRecord(start=0.1 * i, ttft=0.01, latency=0.05, output_tokens=3, prompt_tokens=40,
                             tags={"class": kind, "images": images})
               for i, (kind, images) in enumerate([("image_first", (2, 0)), ("image_repeat", (2, 0)), ("text", ())])]
    stats = compute_stats(records, start=0.0, duration=1.0)
    lines = format_summary(build_result(stats, label=None, backend="openai", model="tiny", num_requests=3,
                                        request_rate=None, burstiness=1.0, max_concurrency=None,
                                        arrivals="all at once", interrupted=None, config={})).splitlines()
    at = lines.index(f"{'Images':-^50}")
    assert lines[at + 1:at + 3] == ["Images sent:                             4         ",
                                    "Distinct images:                         2         "]
    assert [line for line in lines if line.startswith("-") and "Class" in line] == [
        f"{f'Class {kind} (1 requests)':-^50}" for kind in ("image_first", "image_repeat", "text")]


def test_json_round_trip_and_keys(tmp_path) -> None:
    result = make_result(100, label="run-a")
    path = tmp_path / "deep" / "a.json"
    write_json(path, result)
    loaded = load_result(path)
    assert loaded == json.loads(json.dumps(result))
    for key in ("date", "label", "config", "duration", "completed", "failed", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "p99_ttft_ms",
                "std_tpot_ms", "p90_itl_ms", "median_e2el_ms", "errors_by_kind", "input_lens", "output_lens",
                "ttfts", "itls", "e2els", "start_times", "errors", "request_rate", "burstiness", "max_concurrency",
                "total_cached_tokens", "prefix_reuse_ratio", "chunk_reuse_ratio"):
        assert key in loaded, key
    assert loaded["request_rate"] == "inf"
    assert [p.name for p in tmp_path.joinpath("deep").iterdir()] == ["a.json"]  # no temp file left
    write_json(tmp_path / "d.json", disaggregated_result())
    loaded = load_result(tmp_path / "d.json")
    assert loaded["requests_by_disaggregation"] == {"short": 6, "remote": 3}
    assert loaded["latency_by_prefill"]["remote"]["p99_ttft_ms"] == pytest.approx(501.98)  # 500 + 0.99 * 2
    assert loaded["latency_by_class"]["short"]["mean_itl_ms"] == pytest.approx(10.0)


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"), ("{not json", "not valid JSON"), ("[1, 2]", "not a loadgen result"),
    ('{"completed": "x"}', "not a loadgen result"),
])
def test_load_result_errors_name_the_file(tmp_path, content, says) -> None:
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ReportError, match=says) as e:
        load_result(path)
    assert str(path) in str(e.value)


def test_comparison_gives_ratios_and_the_better_run() -> None:
    a, b = make_result(100, label="round_robin"), make_result(50, label="prefix_aware")
    lines = {line.split()[0]: line.split() for line in format_comparison(a, b).splitlines()[3:]}
    assert format_comparison(a, b).splitlines()[:2] == ["A: round_robin", "B: prefix_aware"]
    mean_ttft = lines["mean_ttft_ms"]
    assert float(mean_ttft[1]) == pytest.approx(a["mean_ttft_ms"], rel=1e-3)
    assert float(mean_ttft[3]) == pytest.approx(b["mean_ttft_ms"] / a["mean_ttft_ms"], abs=1e-3)
    assert mean_ttft[4] == "B"  # lower latency is better
    assert lines["request_throughput"][4] == "B"  # b ran shorter: higher throughput
    assert lines["completed"][4] == "="
    assert len(lines["duration"]) == 4  # neutral: no verdict
    assert "p99_itl_ms" in lines and "prefix_reuse_ratio" in lines


def test_compare_command(tmp_path, capsys) -> None:
    write_json(tmp_path / "a.json", make_result(100))
    write_json(tmp_path / "b.json", make_result(80))
    assert main(["loadgen", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"A: {tmp_path / 'a.json'}") and "mean_ttft_ms" in out
    (tmp_path / "bad.json").write_text("{")
    assert main(["loadgen", "compare", str(tmp_path / "a.json"), str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert "bad.json: not valid JSON" in err and "Traceback" not in err
    assert main(["loadgen", "compare", str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_plots_are_written(tmp_path) -> None:
    files = write_plots(make_result(100, failures=3), tmp_path / "plots")
    assert sorted(f.name for f in files) == ["latency_cdf.png", "throughput.png", "ttft_over_time.png"]
    for f in files:
        assert f.stat().st_size > 1000 and f.read_bytes()[:8] == PNG_MAGIC


def test_plots_of_a_run_where_everything_failed(tmp_path) -> None:
    files = write_plots(make_result(100, failures=3, n=0), tmp_path)
    assert all(f.stat().st_size > 0 for f in files)
