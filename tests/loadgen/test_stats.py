"""Run metrics on known inputs, with answers computed by hand (numpy's linear-interpolation
percentiles and population standard deviation, as vLLM's benchmark_serving reports them)."""
from __future__ import annotations

import math

import pytest

from loadgen.records import RequestRecord
from loadgen.stats import compute_stats, parse_goodput, parse_percentiles, percentile_key, tpot

T0 = 100.0


def ok(ttft_ms: float = 10.0, e2el_ms: float = 100.0, out: int = 10, prompt: int = 20, itls_ms=(), start: float = 0.0,
       **usage) -> RequestRecord:
    return RequestRecord(start=T0 + start, ttft=ttft_ms / 1000, latency=e2el_ms / 1000, output_tokens=out,
                         prompt_tokens=prompt, itls=[x / 1000 for x in itls_ms], **usage)


def failed(kind: str, start: float = 0.0) -> RequestRecord:
    return RequestRecord(start=T0 + start, prompt_tokens=5).fail(kind, "boom")


def stats(records, duration: float = 2.0, **kwargs) -> dict:
    return compute_stats(records, start=T0, duration=duration, **kwargs)


def test_percentiles_mean_median_std_on_one_to_ten() -> None:
    result = stats([ok(ttft_ms=i) for i in range(1, 11)])
    assert result["mean_ttft_ms"] == pytest.approx(5.5)
    assert result["median_ttft_ms"] == pytest.approx(5.5)
    assert result["p50_ttft_ms"] == pytest.approx(5.5)
    assert result["p90_ttft_ms"] == pytest.approx(9.1)  # 1 + 0.9 * 9 = 9.1: between 9 and 10
    assert result["p99_ttft_ms"] == pytest.approx(9.91)
    assert result["std_ttft_ms"] == pytest.approx(math.sqrt(8.25))  # population: sum((i-5.5)^2)/10
    custom = stats([ok(ttft_ms=i) for i in range(1, 11)], percentiles=[25, 99.9])
    assert custom["p25_ttft_ms"] == pytest.approx(3.25) and custom["p99.9_ttft_ms"] == pytest.approx(9.991)
    assert "p90_ttft_ms" not in custom


def test_tpot_skips_one_token_requests_and_itl_pools_every_gap() -> None:
    records = [ok(ttft_ms=10, e2el_ms=100, out=10, itls_ms=[5, 15]),  # (100 - 10) / 9 = 10 ms
               ok(ttft_ms=20, e2el_ms=100, out=5, itls_ms=[30]),  # (100 - 20) / 4 = 20 ms
               ok(ttft_ms=50, e2el_ms=50, out=1)]  # one token: no TPOT
    result = stats(records)
    assert tpot(records[2]) is None
    assert result["mean_tpot_ms"] == pytest.approx(15.0) and result["median_tpot_ms"] == pytest.approx(15.0)
    assert result["std_tpot_ms"] == pytest.approx(5.0)
    assert result["mean_itl_ms"] == pytest.approx((5 + 15 + 30) / 3)
    assert result["p50_itl_ms"] == pytest.approx(15.0)
    assert result["mean_e2el_ms"] == pytest.approx((100 + 100 + 50) / 3)
    assert result["itls"] == [pytest.approx([0.005, 0.015]), pytest.approx([0.03]), []]


def test_throughput_totals_and_failures() -> None:
    records = [ok(out=10, prompt=20, start=0.5), ok(out=30, prompt=40, start=0.0), failed("http_500", start=1.0),
               failed("timeout"), failed("http_500")]
    result = stats(records, duration=4.0)
    assert (result["completed"], result["failed"]) == (2, 3)
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (60, 40)
    assert result["request_throughput"] == pytest.approx(0.5)
    assert result["output_throughput"] == pytest.approx(10.0)
    assert result["total_token_throughput"] == pytest.approx(25.0)
    assert result["errors_by_kind"] == {"http_500": 2, "timeout": 1}
    assert result["request_goodput"] is None
    # per-request arrays cover every request, failures with zeros, like vLLM's
    assert result["input_lens"] == [20, 40, 5, 5, 5]
    assert result["output_lens"] == [10, 30, 0, 0, 0]
    assert result["start_times"] == pytest.approx([0.5, 0.0, 1.0, 0.0, 0.0])
    assert result["errors"][:3] == ["", "", "http_500: boom"]


def test_goodput_with_each_slo() -> None:
    records = [ok(ttft_ms=10, e2el_ms=100, out=10),  # tpot 10 ms
               ok(ttft_ms=50, e2el_ms=140, out=10),  # tpot 10 ms
               ok(ttft_ms=10, e2el_ms=280, out=10),  # tpot 30 ms
               ok(ttft_ms=90, e2el_ms=300, out=1),  # 1 token: meets any TPOT SLO
               failed("http_500")]

    def goodput(slos: dict) -> float:
        return stats(records, duration=2.0, goodput=slos)["request_goodput"]

    assert goodput({"ttft": 20}) == pytest.approx(2 / 2)
    assert goodput({"tpot": 11}) == pytest.approx(3 / 2)
    assert goodput({"e2el": 150}) == pytest.approx(2 / 2)
    assert goodput({"ttft": 60, "tpot": 20, "e2el": 200}) == pytest.approx(2 / 2)
    assert goodput({"ttft": 0}) == 0.0


def test_reuse_totals_and_ratios() -> None:
    records = [ok(prompt=100, cached_tokens=50, chunk_reused_tokens=20, recomputed_tokens=2),
               ok(prompt=100, cached_tokens=30, chunk_reused_tokens=0),
               failed("overloaded")]
    result = stats(records)
    assert (result["total_cached_tokens"], result["total_chunk_reused_tokens"], result["total_recomputed_tokens"]) \
        == (80, 20, 2)
    assert result["prefix_reuse_ratio"] == pytest.approx(0.4)
    assert result["chunk_reuse_ratio"] == pytest.approx(0.1)


def test_no_completed_request_reports_zeros() -> None:
    result = stats([failed("unavailable")])
    assert result["completed"] == 0 and result["mean_ttft_ms"] == 0.0 and result["p99_itl_ms"] == 0.0
    assert result["prefix_reuse_ratio"] == 0.0
    assert stats([])["request_throughput"] == 0.0


def test_parse_goodput() -> None:
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2el:0"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 0.0}
    assert parse_goodput([]) == {}


@pytest.mark.parametrize(("item", "says"), [
    ("ttft", "expected KEY:MS"), ("ttft500", "expected KEY:MS"), ("foo:10", "expected KEY:MS"),
    (":10", "expected KEY:MS"), ("ttft:", "is not a number"), ("ttft:abc", "is not a number"),
    ("ttft:-1", ">= 0"), ("tpot:inf", "finite"), ("e2el:nan", "finite"),
])
def test_parse_goodput_rejects_bad_strings(item: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as e:
        parse_goodput([item])
    assert repr(item) in str(e.value)


def test_parse_goodput_rejects_a_key_given_twice() -> None:
    with pytest.raises(ValueError, match="ttft is given twice"):
        parse_goodput(["ttft:1", "ttft:2"])


def test_percentile_option_and_key_spelling() -> None:
    assert parse_percentiles("50,90,99") == [50.0, 90.0, 99.0]
    assert parse_percentiles("99.9") == [99.9]
    for bad in ("", "abc", "50,101", "-1"):
        with pytest.raises(Exception, match="percentiles|expected"):
            parse_percentiles(bad)
    assert [percentile_key(p) for p in (50, 99.0, 99.9)] == ["p50", "p99", "p99.9"]


# ------------------------------------------------------------------------------ disaggregation and classes

def test_disaggregation_counts_workers_and_remote_vs_local_latency() -> None:
    records = [ok(ttft_ms=100, itls_ms=[10, 20], disaggregation="remote", prefill_worker_id="p1", worker_id="d0"),
               ok(ttft_ms=200, itls_ms=[30], disaggregation="remote", prefill_worker_id="p0", worker_id="d1"),
               ok(ttft_ms=300, itls_ms=[40], disaggregation="remote", prefill_worker_id="p1", worker_id="d0"),
               ok(ttft_ms=400, disaggregation="remote", prefill_worker_id="p1", worker_id="d1"),
               ok(ttft_ms=10, itls_ms=[1, 3], disaggregation="short", worker_id="d0"),
               ok(ttft_ms=20, disaggregation="short", worker_id="d0"),
               ok(ttft_ms=30, itls_ms=[5], disaggregation="prefill_queue_full", worker_id="d1"),
               failed("overloaded")]
    result = stats(records)
    assert result["requests_by_disaggregation"] == {"remote": 4, "short": 2, "prefill_queue_full": 1}
    assert list(result["requests_by_disaggregation"]) == ["remote", "short", "prefill_queue_full"]  # most first
    assert result["requests_by_prefill_worker"] == {"p0": 1, "p1": 3}
    assert result["requests_by_worker"] == {"d0": 4, "d1": 3}  # the decode workers
    remote, local = result["latency_by_prefill"]["remote"], result["latency_by_prefill"]["local"]
    assert list(result["latency_by_prefill"]) == ["remote", "local"]
    assert (remote["completed"], local["completed"]) == (4, 3)
    # remote TTFTs 100..400: p99 = 100 + 0.99 * 3 * 100; ITLs 10, 20, 30, 40: p99 = 10 + 0.99 * 3 * 10
    assert remote["mean_ttft_ms"] == pytest.approx(250.0) and remote["p50_ttft_ms"] == pytest.approx(250.0)
    assert remote["p99_ttft_ms"] == pytest.approx(397.0) and remote["median_ttft_ms"] == pytest.approx(250.0)
    assert remote["mean_itl_ms"] == pytest.approx(25.0) and remote["p99_itl_ms"] == pytest.approx(39.7)
    # local TTFTs 10, 20, 30: p99 = 10 + 0.99 * 2 * 10; ITLs 1, 3, 5
    assert local["mean_ttft_ms"] == pytest.approx(20.0) and local["p50_ttft_ms"] == pytest.approx(20.0)
    assert local["p99_ttft_ms"] == pytest.approx(29.8)
    assert local["mean_itl_ms"] == pytest.approx(3.0) and local["p99_itl_ms"] == pytest.approx(4.96)
    assert set(remote) == {"completed", *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
                                          for s in ("mean", "median", "std", "p50", "p90", "p99"))}
    # the run-wide figures are unchanged by the split
    assert result["mean_ttft_ms"] == pytest.approx((100 + 200 + 300 + 400 + 10 + 20 + 30) / 7)


def test_all_remote_keeps_an_empty_local_group() -> None:
    result = stats([ok(ttft_ms=5, disaggregation="remote", prefill_worker_id="p0")], percentiles=[99])
    assert result["latency_by_prefill"]["local"] == {"completed": 0} | {
        f"{s}_{m}_ms": 0.0 for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p99")}
    assert result["latency_by_prefill"]["remote"]["p99_ttft_ms"] == pytest.approx(5.0)


def test_latency_by_class() -> None:
    long, short = {"class": "long"}, {"class": "short"}
    records = [ok(ttft_ms=1000, itls_ms=[50], tags=long), ok(ttft_ms=3000, itls_ms=[70], tags=long),
               ok(ttft_ms=10, itls_ms=[1, 2, 3, 4, 5], tags=short), ok(ttft_ms=20, tags=short),
               ok(ttft_ms=30, tags=short), ok(ttft_ms=40, tags=short), ok(ttft_ms=50, tags=short)]
    failed_long = failed("timeout")
    failed_long.tags = long
    result = stats([*records, failed_long])
    assert list(result["latency_by_class"]) == ["long", "short"]
    by_class = result["latency_by_class"]
    assert by_class["long"]["completed"] == 2 and by_class["short"]["completed"] == 5
    assert by_class["long"]["mean_ttft_ms"] == pytest.approx(2000.0)
    assert by_class["long"]["p99_ttft_ms"] == pytest.approx(2980.0)  # 1000 + 0.99 * 2000
    assert by_class["long"]["p50_itl_ms"] == pytest.approx(60.0)
    assert by_class["short"]["p50_ttft_ms"] == pytest.approx(30.0)
    assert by_class["short"]["p99_ttft_ms"] == pytest.approx(49.6)  # 10 + 0.99 * 4 * 10
    assert by_class["short"]["mean_itl_ms"] == pytest.approx(3.0) and by_class["short"]["p99_itl_ms"] == \
        pytest.approx(4.96)
    assert "requests_by_disaggregation" not in result  # no decision reported
    only_failed = stats([failed_long, ok(tags=short)])["latency_by_class"]
    assert only_failed["long"]["completed"] == 0 and only_failed["short"]["completed"] == 1


def test_tpot_and_e2el_per_class_and_images_counted() -> None:
    records = [ok(ttft_ms=400, e2el_ms=490, out=10, tags={"class": "image_first", "images": (3, 1)}),
               ok(ttft_ms=100, e2el_ms=145, out=10, tags={"class": "image_repeat", "images": (3, 1)}),
               ok(ttft_ms=20, e2el_ms=29, out=4, tags={"class": "text", "images": ()}),
               failed("timeout")]
    records[-1].tags = {"class": "image_first", "images": (7,)}
    result = stats(records)
    by_class = result["latency_by_class"]
    assert list(by_class) == ["image_first", "image_repeat", "text"]
    assert [by_class[c]["completed"] for c in by_class] == [1, 1, 1]  # the failed request is in no figure
    assert by_class["image_first"]["mean_tpot_ms"] == pytest.approx(10.0)  # (490 - 400) / 9
    assert by_class["image_repeat"]["mean_tpot_ms"] == pytest.approx(5.0)  # (145 - 100) / 9
    assert by_class["text"]["mean_tpot_ms"] == pytest.approx(3.0)  # (29 - 20) / 3
    assert [by_class[c]["p99_e2el_ms"] for c in by_class] == pytest.approx([490.0, 145.0, 29.0])
    # every request sent counts, the failed one too: (3, 1) twice and (7,)
    assert (result["images_sent"], result["distinct_images"]) == (5, 3)


def test_without_disaggregation_or_classes_the_result_has_no_new_keys() -> None:
    result = stats([ok(worker_id="w0", tags={"prefix": 1}), failed("timeout")])
    assert not {"requests_by_disaggregation", "requests_by_prefill_worker", "latency_by_prefill",
                "latency_by_class", "images_sent", "distinct_images"} & set(result)
