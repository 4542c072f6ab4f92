"""loadgen.traces: Mooncake and Azure trace parsing, its error messages, and Mooncake token blocks."""
from __future__ import annotations

import json
import math

import pytest

from loadgen.traces import block_tokens, parse_azure_timestamp, read_azure, read_mooncake
from loadgen.types import WorkloadError
from loadgen.workloads import DEFAULT_DATASETS

MOONCAKE = DEFAULT_DATASETS["mooncake"]
AZURE = DEFAULT_DATASETS["azure"]


def write_jsonl(path, objects) -> str:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return str(path)


def record(ts=0, inp=600, out=10, ids=(0, 1)) -> dict:
    return {"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": list(ids)}


# ------------------------------------------------------------------------------ block tokens

def test_block_tokens_deterministic_in_range_and_sized():
    for size, lo, hi in ((16, 10, 500), (512, 1000, 30000), (3, 0, 2)):
        block = block_tokens(12345, size, lo, hi)
        assert block == block_tokens(12345, size, lo, hi)
        assert len(block) == size and all(lo <= t < hi for t in block)
        assert all(isinstance(t, int) for t in block)


def test_block_tokens_of_every_id_in_the_real_trace_differ():
    ids = sorted({h for r in read_mooncake(MOONCAKE)[:2000] for h in r.hash_ids})
    assert len(ids) > 10_000
    blocks = {block_tokens(h, 16, 10, 500) for h in ids}
    assert len(blocks) == len(ids)
    # the same ids again give the same blocks
    assert all(block_tokens(h, 16, 10, 500) in blocks for h in ids[::97])


def test_block_tokens_depend_on_size_and_range_not_on_call_order():
    a = block_tokens(7, 32, 10, 500)
    block_tokens(8, 32, 10, 500)
    assert block_tokens(7, 32, 10, 500) == a
    assert block_tokens(7, 32, 10, 501) != a
    assert block_tokens(0, 16, 10, 500) != block_tokens(1, 16, 10, 500)


def test_block_tokens_reject_ids_outside_64_bits():
    with pytest.raises(ValueError):
        block_tokens(-1, 16, 10, 500)
    with pytest.raises(ValueError):
        block_tokens(1 << 64, 16, 10, 500)


# ------------------------------------------------------------------------------ Mooncake

def test_read_real_mooncake_trace():
    records = read_mooncake(MOONCAKE)
    assert len(records) == 12031
    first = records[0]
    assert (first.line, first.timestamp_s, first.input_length, first.output_length) == (1, 0.0, 6758, 500)
    assert first.hash_ids == tuple(range(14))
    assert all(len(r.hash_ids) == math.ceil(r.input_length / 512) for r in records)
    assert records[-1].line == 12031 and records[-1].timestamp_s == pytest.approx(3536.999)


def test_mooncake_blank_lines_and_decreasing_timestamps_are_fine(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [record(ts=500), "", record(ts=100.5, inp=512, ids=[3])])
    records = read_mooncake(path)
    assert [(r.line, r.timestamp_s) for r in records] == [(1, 0.5), (3, 0.1005)]


@pytest.mark.parametrize("bad, message", [
    ('{"timestamp": 0, "input_length": 600', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"timestamp": 0, "input_length": 600, "output_length": 3}, "missing key 'hash_ids'"),
    ({"timestamp": 0, "hash_ids": [0, 1]}, "missing keys 'input_length', 'output_length'"),
    (record(ts="soon"), "timestamp must be a number"),
    (record(ts=None), "timestamp must be a number"),
    (record(inp=-5, ids=[]), "input_length must be at least 1, got -5"),
    (record(out=-1), "output_length must be at least 1, got -1"),
    (record(out=2.5), "output_length must be an integer"),
    (record(inp=600, ids=[0]), "1 hash_ids, but input_length 600 spans ceil(600/512) = 2 blocks"),
    (record(ids=[0, "x"]), "every hash id must be an integer"),
    (record(ids=[0, -3]), "every hash id must be at least 0"),
    (record(ids=[0, 1 << 64]), "does not fit in 64 bits"),
    ({**record(), "hash_ids": 5}, "hash_ids must be a list"),
])
def test_mooncake_malformed_line_names_file_line_and_problem(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "t.jsonl", [record(), record(ts=10), bad, record(ts=20)])
    with pytest.raises(WorkloadError) as err:
        read_mooncake(path)
    assert f"{path}, line 3" in str(err.value) and message in str(err.value)


def test_mooncake_missing_and_empty_files(tmp_path):
    with pytest.raises(WorkloadError, match="Mooncake trace not found: .*nope.jsonl"):
        read_mooncake(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(WorkloadError, match="holds no records"):
        read_mooncake(tmp_path / "empty.jsonl")
    with pytest.raises(WorkloadError, match="not a file"):
        read_mooncake(tmp_path)


# ------------------------------------------------------------------------------ Azure

def test_parse_azure_timestamp_reads_all_fraction_digits():
    base = parse_azure_timestamp("2023-11-16 18:15:46")
    assert parse_azure_timestamp("2023-11-16 18:15:46.6805900") - base == 680_590_000
    assert parse_azure_timestamp("2023-11-16 18:15:46.123456789") - base == 123_456_789
    assert parse_azure_timestamp("2023-11-16 18:15:46.5") - base == 500_000_000
    assert parse_azure_timestamp("2023-11-17 00:00:00") - base == (5 * 3600 + 44 * 60 + 14) * 10**9
    for bad in ("2023-11-16", "yesterday", "2023-13-01 00:00:00", "2023-11-16 25:00:00",
                "2023-11-16 18:15:46.1234567890"):
        with pytest.raises(ValueError):
            parse_azure_timestamp(bad)


def test_read_real_azure_trace():
    records = read_azure(AZURE)
    assert len(records) == 19366
    assert [r.line for r in records[:3]] == [2, 3, 4]
    assert records[0].timestamp_s == 0.0
    # 18:15:46.6805900, 18:15:50.9951690, 18:15:51.2224670
    assert records[1].timestamp_s == pytest.approx(4.314579, abs=1e-9)
    assert records[2].timestamp_s == pytest.approx(4.541877, abs=1e-9)
    assert (records[0].input_length, records[0].output_length) == (374, 44)
    assert records[-1].line == 19367 and (records[-1].input_length, records[-1].output_length) == (197, 183)


def test_azure_columns_found_by_name(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("GeneratedTokens,TIMESTAMP,ContextTokens\n5,2023-11-16 18:15:46.0000000,7\n\n"
                    "6,2023-11-16 18:15:45.5000000,8\n")
    records = read_azure(path)
    assert [(r.line, r.timestamp_s, r.input_length, r.output_length) for r in records] == [
        (2, 0.0, 7, 5), (4, -0.5, 8, 6)]


@pytest.mark.parametrize("bad, message", [
    ("2023-11-16 18:15:47.0,12", "2 fields, expected 3"),
    ("not a time,12,3", "bad TIMESTAMP 'not a time'"),
    ("2023-11-16 18:15:47.0,twelve,3", "ContextTokens must be an integer, got 'twelve'"),
    ("2023-11-16 18:15:47.0,12,-3", "GeneratedTokens must be at least 1, got -3"),
])
def test_azure_malformed_line_names_file_line_and_problem(tmp_path, bad, message):
    path = tmp_path / "t.csv"
    path.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,10,2\n{bad}\n")
    with pytest.raises(WorkloadError) as err:
        read_azure(path)
    assert f"{path}, line 3" in str(err.value) and message in str(err.value)


def test_azure_bad_header_missing_and_empty_files(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("time,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,10,2\n")
    with pytest.raises(WorkloadError, match="line 1: header .* lacks column\\(s\\) TIMESTAMP"):
        read_azure(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(WorkloadError, match="holds no records"):
        read_azure(path)
    path.write_text("")
    with pytest.raises(WorkloadError, match="is empty"):
        read_azure(path)
    with pytest.raises(WorkloadError, match="Azure trace not found: .*missing.csv"):
        read_azure(tmp_path / "missing.csv")
