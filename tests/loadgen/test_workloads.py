"""loadgen.workloads: options, determinism, shapes and lengths of every workload, and bad input."""
from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import Counter

import pytest

from loadgen.traces import read_azure, read_mooncake
from loadgen.types import Session, WorkloadError
from loadgen.workloads import DEFAULT_DATASETS, WORKLOADS, MixedWorkload, add_workload_arguments, build_workload
from loadgen.workloads.chat import TOOL_PREFIX
from loadgen.workloads.rag import INSTRUCTION

TINY = ["--token-range", "10:500"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_workload_arguments(p)
    p.add_argument("--seed", type=int, default=0)  # the runner's option
    return p


def build(*argv: str):
    return build_workload(parser().parse_args(list(argv)))


def take(*argv: str, n: int = 20) -> list[Session]:
    return list(itertools.islice(build(*argv).sessions(), n))


def ids(sessions: list[Session]) -> list[tuple[int, ...]]:
    return [s.turns[0].token_ids for s in sessions]


def words(message: dict) -> int:
    return len(message["content"].split())


# ------------------------------------------------------------------------------ registry and options

def test_registry_options_and_defaults():
    assert set(WORKLOADS) == {"rag", "prefix-repetition", "multi-turn", "agent", "mooncake", "azure", "random",
                              "mixed", "multimodal"}
    args = parser().parse_args([])
    assert args.workload == "random" and args.token_range == "1000:30000" and args.dataset is None
    help_text = parser().format_help()
    for shown in ("(default: 256)", "(default: 1000:30000)", "(default: 32 for rag, 128 otherwise)",
                  "--long-fraction F share of requests that are long, 0 <= F <= 1 (default: 0.1)",
                  "--short-input-len LO:HI prompt tokens of a short request, uniform in [LO, HI] (default: 32:128)",
                  "(default: 0 for multi-turn, 64 for agent)", "../shared/data/rag/musique_dev.json"):
        assert shown in " ".join(help_text.split()), shown
    assert "(default: None)" not in help_text
    for name in WORKLOADS:
        assert build("--workload", name).name == name


def test_default_datasets_resolve_beside_the_repository():
    for path in DEFAULT_DATASETS.values():
        assert path.is_file(), path
        assert path.parents[2].name == "shared"


# ------------------------------------------------------------------------------ random

def test_random_lengths_range_and_determinism():
    sessions = take("--input-len", "50", "--output-len", "7", *TINY)
    assert all(len(t) == 50 and all(10 <= x < 500 for x in t) for t in ids(sessions))
    assert all(s.turns[0].max_tokens == 7 and s.arrival_s is None for s in sessions)
    assert ids(take("--input-len", "50", *TINY)) == ids(sessions)
    assert ids(take("--input-len", "50", "--seed", "1", *TINY)) != ids(sessions)


def test_random_range_ratio_spreads_lengths_like_vllm():
    sessions = take("--input-len", "100", "--output-len", "10", "--range-ratio", "0.5", n=300)
    lengths = [len(t) for t in ids(sessions)]
    outs = [s.turns[0].max_tokens for s in sessions]
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 30
    assert min(outs) >= 5 and max(outs) <= 15 and len(set(outs)) > 5


# ------------------------------------------------------------------------------ prefix-repetition

def test_prefix_repetition_shares_exactly_the_prefix():
    sessions = take("--workload", "prefix-repetition", "--prefix-len", "40", "--suffix-len", "12",
                    "--num-prefixes", "3", *TINY, n=30)
    tokens = ids(sessions)
    assert all(len(t) == 52 for t in tokens)
    groups = Counter(s.tags["prefix"] for s in sessions)
    assert groups == {0: 10, 1: 10, 2: 10}
    for (a, sa), (b, sb) in itertools.combinations(zip(tokens, sessions), 2):
        if sa.tags["prefix"] == sb.tags["prefix"]:
            assert a[:40] == b[:40] and a[40:] != b[40:]
        else:
            assert a[0] != b[0]
    # each round of 3 uses every prefix once
    assert all(len({s.tags["prefix"] for s in sessions[i:i + 3]}) == 3 for i in range(0, 30, 3))
    again = take("--workload", "prefix-repetition", "--prefix-len", "40", "--suffix-len", "12",
                 "--num-prefixes", "3", *TINY, n=30)
    assert ids(again) == tokens
    other = take("--workload", "prefix-repetition", "--prefix-len", "40", "--num-prefixes", "3", "--seed", "5",
                 *TINY, n=30)
    assert [t[:40] for t in ids(other)] != [t[:40] for t in tokens]


# ------------------------------------------------------------------------------ mixed

MIXED = ["--workload", "mixed", "--long-input-len", "40:60", "--short-input-len", "20:30", *TINY]


def test_mixed_classes_lengths_and_determinism():
    sessions = take(*MIXED, "--long-fraction", "0.3", "--long-output-len", "2", "--short-output-len", "9", n=200)
    for s in sessions:
        (turn,) = s.turns
        lo, hi, out = (40, 60, 2) if s.tags["class"] == "long" else (20, 30, 9)
        assert lo <= len(turn.token_ids) <= hi and turn.max_tokens == out, s
        assert all(10 <= x < 500 for x in turn.token_ids) and s.arrival_s is None
    assert {s.tags["class"] for s in sessions} == {"long", "short"}
    lengths = Counter(len(t) for t in ids(sessions))
    assert {40, 60, 20, 30} <= set(lengths)  # both ends of both ranges are drawn
    assert len({t[:16] for t in ids(sessions)}) == 200  # no two prompts share a first block
    again = take(*MIXED, "--long-fraction", "0.3", "--long-output-len", "2", "--short-output-len", "9", n=200)
    assert ids(again) == ids(sessions) and [s.tags for s in again] == [s.tags for s in sessions]
    assert ids(take(*MIXED, "--long-fraction", "0.3", "--seed", "1", n=200)) != ids(sessions)


def test_mixed_long_fraction_defaults_and_extremes():
    # Default long share 0.1 over 4000 requests (seed 0): binomial sd 0.0047, so +-0.02 is > 4 sd.
    counts = Counter(s.tags["class"] for s in take(*MIXED, n=4000))
    assert abs(counts["long"] / 4000 - 0.1) < 0.02, counts
    assert {s.tags["class"] for s in take(*MIXED, "--long-fraction", "0", n=300)} == {"short"}
    assert {s.tags["class"] for s in take(*MIXED, "--long-fraction", "1", n=300)} == {"long"}
    fixed = take("--workload", "mixed", "--long-input-len", "7:7", "--short-input-len", "3:3", *TINY, n=50)
    assert {(s.tags["class"], len(s.turns[0].token_ids)) for s in fixed} == {("long", 7), ("short", 3)}
    default = build("--workload", "mixed")
    assert default.classes == {"long": ((4000, 6000), 8), "short": ((32, 128), 128)}
    assert (default.long_fraction, default.token_range) == (0.1, (1000, 30000))
    with pytest.raises(WorkloadError, match=r"--long-input-len 5:4: need 1 <= LO <= HI"):
        MixedWorkload(long_input_len=(5, 4))
    with pytest.raises(WorkloadError, match=r"--long-fraction must be in \[0, 1\], got 2"):
        MixedWorkload(long_fraction=2)


# ------------------------------------------------------------------------------ rag

def test_rag_segments_and_reusable_flags():
    dataset = json.loads(DEFAULT_DATASETS["rag"].read_text())
    sessions = take("--workload", "rag", "--num-docs", "3", n=10)
    for s in sessions:
        turn, item = s.turns[0], dataset[s.tags["question"]]
        assert turn.max_tokens == 32 and turn.prompt is None
        assert [reusable for _, reusable in turn.segments] == [False, True, True, True, False]
        assert turn.segments[0][0] == INSTRUCTION
        assert turn.segments[-1][0] == f"Question: {item['question']}\nAnswer:"
        for (text, _), ctx in zip(turn.segments[1:4], item["ctxs"]):
            assert text == f"Passage: {ctx['text']}\n"
    assert [s.tags for s in take("--workload", "rag", "--num-docs", "3", n=10)] == [s.tags for s in sessions]
    assert [s.tags for s in take("--workload", "rag", "--seed", "9", n=10)] != [s.tags for s in sessions]


def test_rag_titles_word_limit_and_no_chunks(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": "Why?", "answers": ["x"],
                                 "ctxs": [{"title": "T1", "text": "one two  three four"}, {"text": "five six"}]}]))
    turn = take("--workload", "rag", "--dataset", str(path), "--num-docs", "2", "--max-doc-words", "3",
                "--output-len", "5", n=1)[0].turns[0]
    assert turn.max_tokens == 5
    assert turn.segments[1:3] == (("Title: T1\none two three\n", True), ("Passage: five six\n", True))
    plain = take("--workload", "rag", "--dataset", str(path), "--num-docs", "2", "--max-doc-words", "3",
                 "--no-chunks", n=1)[0].turns[0]
    assert plain.segments is None and plain.prompt == "".join(text for text, _ in turn.segments)


def test_rag_popularity_skew_makes_the_top_question_recur():
    def top_share(skew: str) -> float:
        counts = Counter(s.tags["question"] for s in take("--workload", "rag", "--popularity-skew", skew, n=2000))
        return counts.most_common(1)[0][1] / 2000

    uniform, skewed = top_share("0"), top_share("1.2")
    assert uniform < 0.03  # 100 questions: about 1% each
    assert skewed > 0.15 and skewed > 5 * uniform


def test_rag_shuffle_docs_presents_the_same_passages_in_other_orders():
    dataset = json.loads(DEFAULT_DATASETS["rag"].read_text())
    sessions = take("--workload", "rag", "--num-docs", "4", "--shuffle-docs", "--popularity-skew", "3", n=40)
    orders = {}
    for s in sessions:
        chunks = [text for text, reusable in s.turns[0].segments if reusable]
        expected = [f"Passage: {c['text']}\n" for c in dataset[s.tags["question"]]["ctxs"][:4]]
        assert sorted(chunks) == sorted(expected)
        orders.setdefault(s.tags["question"], set()).add(tuple(chunks))
    assert max(len(o) for o in orders.values()) > 1  # a recurring question came with its passages reordered


# ------------------------------------------------------------------------------ multi-turn and agent

def test_multi_turn_sessions():
    sessions = take("--workload", "multi-turn", "--num-turns", "3", "--turn-input-len", "20",
                    "--system-prompt-len", "30", "--output-len", "9", n=5)
    systems = {s.turns[0].messages[0]["content"] for s in sessions}
    assert len(systems) == 1 and len(systems.pop().split()) == 30
    users = set()
    for s in sessions:
        assert len(s.turns) == 3 and all(t.max_tokens == 9 and t.pause_s == 0 for t in s.turns)
        assert [m["role"] for m in s.turns[0].messages] == ["system", "user"]
        for t in s.turns[1:]:
            assert [m["role"] for m in t.messages] == ["user"]
        user_messages = [s.turns[0].messages[1]] + [t.messages[0] for t in s.turns[1:]]
        assert all(words(m) == 20 for m in user_messages)
        users.update(m["content"] for m in user_messages)
    assert len(users) == 15
    plain = take("--workload", "multi-turn", n=3)
    assert all(len(s.turns) == 4 and [m["role"] for m in s.turns[0].messages] == ["user"] for s in plain)
    assert all(words(s.turns[0].messages[0]) == 48 for s in plain)
    assert [s.turns for s in take("--workload", "multi-turn", n=3)] == [s.turns for s in plain]
    assert [s.turns for s in take("--workload", "multi-turn", "--seed", "2", n=3)] != [s.turns for s in plain]


def test_agent_sessions():
    sessions = take("--workload", "agent", "--num-turns", "3", "--tool-output-len", "25", n=4)
    systems = {s.turns[0].messages[0]["content"] for s in sessions}
    assert len(systems) == 1 and len(systems.pop().split()) == 64
    for s in sessions:
        assert len(s.turns) == 3 and s.turns[0].pause_s == 0.0
        for t in s.turns[1:]:
            (message,) = t.messages
            assert message["role"] == "user" and message["content"].startswith(TOOL_PREFIX + " ")
            assert words(message) == 25 + len(TOOL_PREFIX.split())
            assert t.pause_s > 0


@pytest.mark.parametrize("dist", ["exponential", "lognormal"])
def test_agent_pause_mean(dist):
    sessions = take("--workload", "agent", "--num-turns", "41", "--turn-input-len", "1", "--tool-output-len", "1",
                    "--system-prompt-len", "0", "--tool-pause-dist", dist, "--tool-pause-mean", "2.0", n=500)
    pauses = [t.pause_s for s in sessions for t in s.turns[1:]]
    assert len(pauses) == 20_000 and min(pauses) > 0
    assert sum(pauses) / len(pauses) == pytest.approx(2.0, rel=0.05)
    assert len(set(pauses)) == len(pauses)


def test_agent_constant_pause_is_exact():
    sessions = take("--workload", "agent", "--tool-pause-dist", "constant", "--tool-pause-mean", "0.25", n=5)
    assert {t.pause_s for s in sessions for t in s.turns[1:]} == {0.25}


# ------------------------------------------------------------------------------ mooncake

def test_mooncake_shared_ids_share_exactly_those_blocks():
    records = read_mooncake(DEFAULT_DATASETS["mooncake"])[:300]
    sessions = take("--workload", "mooncake", "--block-size", "16", *TINY, n=300)
    assert [s.tags["line"] for s in sessions] == [r.line for r in records]
    tokens = ids(sessions)
    checked = 0
    for i, j in itertools.combinations(range(60), 2):
        a, b = records[i].hash_ids, records[j].hash_ids
        shared = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if shared < min(len(a), len(b)) - 1:  # both have a full block after the shared ones
            assert tokens[i][:16 * shared] == tokens[j][:16 * shared]
            assert tokens[i][16 * shared:16 * (shared + 1)] != tokens[j][16 * shared:16 * (shared + 1)]
            checked += 1
    assert checked > 1000
    for r, s in zip(records, sessions):
        assert len(s.turns[0].token_ids) == math.ceil(r.input_length * 16 / 512)
        assert s.turns[0].max_tokens == r.output_length and s.tags["blocks"] == len(r.hash_ids)
    full = take("--workload", "mooncake", n=1)[0]
    assert len(full.turns[0].token_ids) == records[0].input_length
    assert all(1000 <= t < 30000 for t in full.turns[0].token_ids)


def test_mooncake_time_scale_offset_and_limits():
    records = read_mooncake(DEFAULT_DATASETS["mooncake"])
    sessions = take("--workload", "mooncake", "--block-size", "16", "--time-scale", "0.1", "--trace-offset", "1000",
                    "--max-output-len", "50", *TINY, n=500)
    start = records[1000].timestamp_s
    for r, s in zip(records[1000:], sessions):
        assert s.arrival_s == pytest.approx((r.timestamp_s - start) * 0.1)
        assert s.turns[0].max_tokens == min(r.output_length, 50)
    assert sessions[-1].arrival_s > 0
    workload = build("--workload", "mooncake", "--block-size", "16", "--max-input-len", "300", *TINY)
    expected = sum(1 for r in records if math.ceil(r.input_length / 32) > 300)
    assert workload.skipped == expected > 0
    kept = list(itertools.islice(workload.sessions(), 500))
    assert all(len(s.turns[0].token_ids) <= 300 for s in kept)
    assert len(kept) == 500 and {s.tags["pass"] for s in kept} == {0}


def test_trace_repeats_after_its_end(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"timestamp": ts, "input_length": 20, "output_length": 3, "hash_ids": [h]})
                            + "\n" for ts, h in ((0, 1), (3000, 2), (1000, 3))))
    sessions = take("--workload", "mooncake", "--dataset", str(path), "--block-size", "16", *TINY, n=6)
    assert [s.arrival_s for s in sessions] == [0.0, 1.0, 3.0, 4.5, 5.5, 7.5]
    assert [(s.tags["pass"], s.tags["line"]) for s in sessions] == [(0, 1), (0, 3), (0, 2), (1, 1), (1, 3), (1, 2)]
    assert sessions[0].turns == sessions[3].turns and len({s.session_id for s in sessions}) == 6


# ------------------------------------------------------------------------------ azure

def test_azure_replay():
    records = read_azure(DEFAULT_DATASETS["azure"])
    assert len(records) == 19366
    sessions = take("--workload", "azure", "--time-scale", "0.5", "--max-output-len", "100", *TINY, n=50)
    for r, s in zip(records, sessions):
        assert s.arrival_s == pytest.approx(r.timestamp_s * 0.5)
        assert len(s.turns[0].token_ids) == r.input_length
        assert s.turns[0].max_tokens == min(r.output_length, 100)
    assert sessions[1].arrival_s == pytest.approx(4.314579 * 0.5)
    assert ids(take("--workload", "azure", *TINY, n=5)) == ids(sessions[:5])
    assert ids(take("--workload", "azure", "--seed", "3", *TINY, n=5)) != ids(sessions[:5])
    offset = take("--workload", "azure", "--trace-offset", "2", "--max-input-len", "500", n=5)
    # line 4 (879 tokens) is skipped: the replay starts at line 5
    assert offset[0].arrival_s == 0.0 and offset[0].tags["line"] == 5
    assert offset[1].arrival_s == pytest.approx(records[4].timestamp_s - records[3].timestamp_s)
    assert all(len(s.turns[0].token_ids) <= 500 for s in offset)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("argv, message", [
    (["--token-range", "500:10"], "need 0 <= LO < HI"),
    (["--token-range=-1:10"], "need 0 <= LO < HI"),
    (["--token-range", "10-500"], "--token-range must be LO:HI"),
    (["--input-len", "0"], "--input-len must be at least 1, got 0"),
    (["--output-len", "-2"], "--output-len must be at least 1, got -2"),
    (["--range-ratio", "1.0"], "--range-ratio must be in [0, 1)"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--dataset", "x.json"], "--dataset applies to the rag, mooncake, azure workloads"),
    (["--workload", "prefix-repetition", "--prefix-len", "0"], "--prefix-len must be at least 1"),
    (["--workload", "prefix-repetition", "--suffix-len", "-1"], "--suffix-len must be at least 0"),
    (["--workload", "prefix-repetition", "--num-prefixes", "0"], "--num-prefixes must be at least 1"),
    (["--workload", "mixed", "--long-fraction", "1.5"], "--long-fraction must be in [0, 1], got 1.5"),
    (["--workload", "mixed", "--long-fraction", "-0.1"], "--long-fraction must be in [0, 1], got -0.1"),
    (["--workload", "mixed", "--long-fraction", "nan"], "--long-fraction must be in [0, 1], got nan"),
    (["--workload", "mixed", "--long-input-len", "6000:4000"], "--long-input-len 6000:4000: need 1 <= LO <= HI"),
    (["--workload", "mixed", "--short-input-len", "0:10"], "--short-input-len 0:10: need 1 <= LO <= HI"),
    (["--workload", "mixed", "--short-input-len", "64"], "--short-input-len must be LO:HI with integers 1 <= LO"),
    (["--workload", "mixed", "--long-input-len", "a:b"], "--long-input-len must be LO:HI with integers"),
    (["--workload", "mixed", "--long-output-len", "0"], "--long-output-len must be at least 1, got 0"),
    (["--workload", "mixed", "--short-output-len", "-1"], "--short-output-len must be at least 1, got -1"),
    (["--workload", "mixed", "--output-len", "5"], "--output-len does not apply to the mixed workload"),
    (["--workload", "rag", "--num-docs", "0"], "--num-docs must be at least 1"),
    (["--workload", "rag", "--num-docs", "11"], "10 passages, fewer than --num-docs 11"),
    (["--workload", "rag", "--popularity-skew", "-0.5"], "--popularity-skew must be at least 0.0"),
    (["--workload", "rag", "--max-doc-words", "-1"], "--max-doc-words must be at least 0"),
    (["--workload", "multi-turn", "--num-turns", "0"], "--num-turns must be at least 1"),
    (["--workload", "multi-turn", "--system-prompt-len", "-1"], "--system-prompt-len must be at least 0"),
    (["--workload", "agent", "--tool-pause-mean", "-1"], "--tool-pause-mean must be at least 0.0"),
    (["--workload", "agent", "--tool-output-len", "0"], "--tool-output-len must be at least 1"),
    (["--workload", "mooncake", "--block-size", "0"], "--block-size must be at least 1"),
    (["--workload", "mooncake", "--time-scale", "0"], "--time-scale must be a positive number"),
    (["--workload", "mooncake", "--trace-offset", "12031"], "--trace-offset 12031 skips all 12031 records"),
    (["--workload", "azure", "--trace-offset", "-1"], "--trace-offset must be at least 0"),
    (["--workload", "azure", "--max-input-len", "1"], "all 19366 records of"),
    (["--workload", "azure", "--max-output-len", "-1"], "--max-output-len must be at least 0"),
    (["--workload", "rag", "--dataset", "/nonexistent/q.json"], "RAG dataset not found: /nonexistent/q.json"),
    (["--workload", "mooncake", "--dataset", "/nonexistent/t.jsonl"], "Mooncake trace not found"),
    (["--workload", "azure", "--dataset", "/nonexistent/t.csv"], "Azure trace not found"),
])
def test_bad_options_and_files(argv, message):
    with pytest.raises(WorkloadError) as err:
        build(*argv)
    assert message in str(err.value)


@pytest.mark.parametrize("content, message", [
    ('[{"question": "q", "ctxs": [{"text": "t"}]},\n {"question": "r",\n', "line 3: not valid JSON"),
    ('{"question": "q"}', "expected a JSON list of questions"),
    ("[]", "holds no questions"),
    ('[{"question": "q", "ctxs": [{"text": "t"}]}, {"ctxs": [{"text": "t"}]}]', "item 1: expected an object"),
    ('[{"question": "q", "ctxs": []}]', "item 0: 'ctxs' must be a non-empty list"),
    ('[{"question": "q", "ctxs": [{"title": "a"}]}]', "item 0, passage 0: expected an object with a string 'text'"),
])
def test_rag_malformed_dataset(tmp_path, content, message):
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(WorkloadError) as err:
        build("--workload", "rag", "--dataset", str(path), "--num-docs", "1")
    assert str(path) in str(err.value) and message in str(err.value)


def test_malformed_trace_line_through_the_workload(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 20, "output_length": 3, "hash_ids": [1]}\n'
                    '{"timestamp": 1, "input_length": 20, "output_length": 3}\n')
    with pytest.raises(WorkloadError, match=r"t\.jsonl, line 2: missing key 'hash_ids'"):
        build("--workload", "mooncake", "--dataset", str(path))


def test_mixed_spreads_long_requests_evenly():
    """Every window of n consecutive requests holds n * f long ones, rounded down or up, whatever the seed."""
    import itertools
    import math

    from loadgen.workloads import MixedWorkload

    for seed in range(5):
        w = MixedWorkload(long_fraction=0.03, long_input_len=(8, 8), short_input_len=(4, 4), seed=seed)
        kinds = [s.tags["class"] == "long" for s in itertools.islice(w.sessions(), 400)]
        for n in (33, 120, 400):
            counts = {sum(kinds[i:i + n]) for i in range(0, 400 - n + 1, 7)}
            assert counts <= {math.floor(n * 0.03), math.ceil(n * 0.03)}, (seed, n, counts)
