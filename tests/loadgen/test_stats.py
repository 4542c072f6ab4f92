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
