"""`kvweave generate`, run in-process through `cli.main.main` on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from kvweave.sampling_params import SamplingParams

ENGINE_FLAGS = ["--dtype", "float32", "--num-blocks", "128", "--num-threads", "1"]


def generate(model: Path | str, *args: str) -> list[str]:
    return ["generate", "--model", str(model), *ENGINE_FLAGS, *args]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def greedy_reference(engine_factory, model: Path, prompt, max_tokens: int, **params):
    engine = engine_factory(model)
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, **params))
    return out


def test_jsonl_prompt_and_messages_lines(tiny_hf_model, tiny_engine_factory, tmp_path, capsys) -> None:
    messages = [{"role": "user", "content": "Hello world!"}]
    src = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"id": "a", "prompt": "The quick brown fox", "max_tokens": 4, "ignore_eos": True}),
        json.dumps({"id": "b", "messages": messages, "ignore_eos": True}),
    ])
    rc = main(generate(tiny_hf_model, "--input", str(src), "--max-tokens", "3"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["prompt"] == "The quick brown fox" and rows[0]["max_tokens"] == 4
    assert rows[1]["messages"] == messages
    expected = [greedy_reference(tiny_engine_factory, tiny_hf_model, "The quick brown fox", 4, ignore_eos=True),
                greedy_reference(tiny_engine_factory, tiny_hf_model, {"messages": messages}, 3, ignore_eos=True)]
    for row, out in zip(rows, expected):
        assert set(row) >= {"text", "token_ids", "finish_reason", "num_prompt_tokens"}
        assert "error" not in row
        assert (row["token_ids"], row["text"]) == (out.token_ids, out.text)
        assert (row["finish_reason"], row["num_prompt_tokens"]) == ("length", out.num_prompt_tokens)
    assert [len(r["token_ids"]) for r in rows] == [4, 3]  # the line's max_tokens beats --max-tokens


def test_bad_lines_are_reported_by_number_and_the_rest_complete(tiny_hf_model, tmp_path, capsys) -> None:
    src = write_lines(tmp_path / "in.jsonl", [
        json.dumps({"id": 1, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}),
        "",                                                   # blank lines are skipped but counted
        '{"prompt": "unterminated',                           # line 3: malformed JSON
        json.dumps({"id": 4, "max_tokens": 3}),               # line 4: no prompt
        json.dumps({"id": 5, "prompt": "x", "max_tokens": 0}),  # line 5: invalid max_tokens
        json.dumps({"id": 6, "prompt": "World", "max_tokens": 2, "ignore_eos": True}),
        json.dumps(["not", "an", "object"]),                  # line 7
    ])
    out_file = tmp_path / "out.jsonl"
    rc = main(generate(tiny_hf_model, "--input", str(src), "--output", str(out_file)))
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.out == ""
    assert "Traceback" not in captured.err
    err_lines = [line for line in captured.err.splitlines() if line.startswith("error: line")]
    assert [line.split(":")[1].strip() for line in err_lines] == ["line 3", "line 4", "line 5", "line 7"]
    assert "max_tokens" in err_lines[2] and "prompt" in err_lines[1]
    assert "4 of 6 lines failed" in captured.err
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6  # one per non-blank input line, in order
    assert [("error" in r) for r in rows] == [False, True, True, True, False, True]
    assert (rows[0]["id"], len(rows[0]["token_ids"]), rows[0]["finish_reason"]) == (1, 3, "length")
    assert (rows[4]["id"], len(rows[4]["token_ids"]), rows[4]["finish_reason"]) == (6, 2, "length")
    assert rows[1]["error"].startswith("line 3:")
    assert rows[2]["id"] == 4 and rows[2]["error"].startswith("line 4:")
    assert rows[3]["id"] == 5 and rows[3]["error"].startswith("line 5:")


def test_prompt_prints_the_completion(tiny_hf_model, tiny_engine_factory, capsys) -> None:
    rc = main(generate(tiny_hf_model, "--prompt", "The quick brown fox", "--max-tokens", "6"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    expected = greedy_reference(tiny_engine_factory, tiny_hf_model, "The quick brown fox", 6)
    assert captured.out == expected.text + "\n"
    assert len(expected.token_ids) >= 1


def test_prompt_as_chat(tiny_hf_model, tiny_engine_factory, capsys) -> None:
    rc = main(generate(tiny_hf_model, "--prompt", "hi", "--chat", "--max-tokens", "4"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    expected = greedy_reference(tiny_engine_factory, tiny_hf_model,
                                {"messages": [{"role": "user", "content": "hi"}]}, 4)
    assert captured.out == expected.text + "\n"


@pytest.mark.parametrize("source", [["--prompt", "Hello"], ["--input", "IN"]])
def test_unknown_model_is_a_clear_error(source: list[str], tmp_path, capsys) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"prompt": "Hello"})])
    source = [str(src) if a == "IN" else a for a in source]
    rc = main(["generate", "--model", "no-such-model", *ENGINE_FLAGS, *source])
    captured = capsys.readouterr()
    assert rc != 0
    assert "Traceback" not in captured.err
    assert "error:" in captured.err and "no-such-model" in captured.err
    assert "smollm2-135m" in captured.err  # lists the built-in names


def test_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    rc = main(["generate", "--model", str(tmp_path / "empty"), *ENGINE_FLAGS, "--prompt", "Hello"])
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.err.startswith("error:") and "Traceback" not in captured.err


def test_missing_input_file_is_a_clear_error(tiny_hf_model, tmp_path, capsys) -> None:
    rc = main(generate(tiny_hf_model, "--input", str(tmp_path / "missing.jsonl")))
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.err.startswith("error: cannot read --input")


def test_invalid_prompt_is_a_clear_error(tiny_hf_model, capsys) -> None:
    rc = main(generate(tiny_hf_model, "--prompt", "Hello", "--max-tokens", "0"))
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.err.startswith("error:") and "max_tokens" in captured.err
    assert "Traceback" not in captured.err


def test_a_command_is_required(capsys) -> None:
    assert main([]) != 0
    assert "generate" in capsys.readouterr().out


def test_bad_sampling_flag_fails_once_before_the_model_loads(capsys) -> None:
    assert main(generate("/nonexistent/model", "--prompt", "x", "--top-p", "0")) == 2
    err = capsys.readouterr().err
    assert "top_p must be in (0, 1]" in err and "nonexistent" not in err and "Traceback" not in err


def test_sampling_flags_come_from_sampling_params_and_ignore_the_environment(monkeypatch) -> None:
    from cli.generate import _defaults
    from cli.main import build_parser

    monkeypatch.setenv("KVWEAVE_TEMPERATURE", "0.7")
    monkeypatch.setenv("KVWEAVE_MAX_TOKENS", "5")
    args = build_parser("generate").parse_args(["generate", "--prompt", "x", "--top-k", "4"])
    assert _defaults(args) == {"max_tokens": 128, "temperature": 0.0, "top_p": 1.0, "top_k": 4, "seed": None}
