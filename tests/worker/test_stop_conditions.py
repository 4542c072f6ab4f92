"""How requests end, against the reference: streamed deltas that add up to the final output, stop
strings (excluded from the text, never streamed), stop token ids, EOS from the tokenizer and the
model config, and max_tokens."""
from __future__ import annotations

import json
import shutil

import pytest

from engine_reference import assert_matches_reference, greedy, reference_greedy, run_to_end
from worker.engine import LLMEngine, Prompt
from worker.output import RequestOutput
from kvweave.sampling_params import SamplingParams

STOP_PROMPT = "Hello world! hello World?"


def stream(engine: LLMEngine, prompt: Prompt, params: SamplingParams) -> list[RequestOutput]:
    engine.add_request(prompt, params)
    return run_to_end(engine)


def expected_stop(engine: LLMEngine, ref_tokens: list[int], stop: str) -> tuple[list[int], str]:
    """Tokens up to the one that completes `stop`, and the text before it."""
    for k in range(1, len(ref_tokens) + 1):
        text = engine.tokenizer.decode(ref_tokens[:k])
        if stop in text:
            return ref_tokens[:k], text[:text.index(stop)]
    raise AssertionError(f"test setup: {stop!r} is not in the reference text {text!r}")


def test_streamed_deltas_add_up_to_the_final_output(lively_engine) -> None:
    outs = stream(lively_engine, STOP_PROMPT, greedy(24))
    final = outs[-1]
    assert [o.finished for o in outs] == [False] * 23 + [True]
    assert all(len(o.new_token_ids) == 1 for o in outs)
    assert [t for o in outs for t in o.new_token_ids] == final.token_ids
    assert "".join(o.new_text for o in outs) == final.text
    assert final.text == lively_engine.tokenizer.decode(final.token_ids)
    assert all(o.text == "".join(p.new_text for p in outs[:i + 1]) for i, o in enumerate(outs))
    assert_matches_reference(lively_engine, lively_engine.encode_prompt(STOP_PROMPT), final, 24)


@pytest.mark.parametrize("stop", ["ore", "e he", "'re", "St"])
def test_stop_string_ends_generation_and_is_excluded(lively_engine, stop: str) -> None:
    prompt_ids = lively_engine.encode_prompt(STOP_PROMPT)
    ref_tokens, _ = reference_greedy(lively_engine, prompt_ids, 24)
    tokens, text = expected_stop(lively_engine, ref_tokens, stop)
    outs = stream(lively_engine, STOP_PROMPT, SamplingParams(max_tokens=24, temperature=0, stop=[stop]))
    final = outs[-1]
    assert (final.token_ids, final.text) == (tokens, text)
    assert (final.finish_reason, final.stop_reason) == ("stop", stop)
    assert "".join(o.new_text for o in outs) == text  # no part of the stop string was streamed


def test_the_earliest_of_several_stop_strings_wins(lively_engine) -> None:
    prompt_ids = lively_engine.encode_prompt(STOP_PROMPT)
    ref_tokens, _ = reference_greedy(lively_engine, prompt_ids, 24)
    tokens, text = expected_stop(lively_engine, ref_tokens, "ve")
    (out,) = lively_engine.generate([STOP_PROMPT], SamplingParams(max_tokens=24, temperature=0,
                                                                 stop=["'re", "ve", "zzz"]))
    assert (out.token_ids, out.text, out.stop_reason) == (tokens, text, "ve")


def test_stop_string_on_the_last_allowed_token_is_a_stop(lively_engine) -> None:
    prompt_ids = lively_engine.encode_prompt(STOP_PROMPT)
    ref_tokens, _ = reference_greedy(lively_engine, prompt_ids, 24)
    tokens, text = expected_stop(lively_engine, ref_tokens, "ore")
    (out,) = lively_engine.generate([STOP_PROMPT], SamplingParams(max_tokens=len(tokens), temperature=0,
                                                                 stop=["ore"]))
    assert (out.token_ids, out.text) == (tokens, text)
    assert (out.finish_reason, out.stop_reason) == ("stop", "ore")


def test_stop_token_id_ends_generation(lively_engine) -> None:
    prompt_ids = lively_engine.encode_prompt(STOP_PROMPT)
    ref_tokens, _ = reference_greedy(lively_engine, prompt_ids, 24)
    stop_tok = ref_tokens[5]
    k = ref_tokens.index(stop_tok) + 1
    (out,) = lively_engine.generate([STOP_PROMPT], SamplingParams(max_tokens=24, temperature=0,
                                                                 stop_token_ids=[stop_tok]))
    assert out.token_ids == ref_tokens[:k]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)


def test_eos_ends_generation_with_stop(lively_engine) -> None:
    # On this seeded checkpoint the greedy continuation of this prompt reaches <|im_end|> (eos).
    prompt = "Retrieved documents"
    eos = lively_engine.tokenizer.eos_token_ids[0]
    ref_tokens, _ = reference_greedy(lively_engine, lively_engine.encode_prompt(prompt), 32)
    assert eos in ref_tokens, "test setup: the reference continuation has no eos"
    k = ref_tokens.index(eos) + 1
    (out,) = lively_engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0))
    assert out.token_ids == ref_tokens[:k]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    assert out.text == lively_engine.tokenizer.decode(ref_tokens[:k])  # eos is special: not in the text
    (ignored,) = lively_engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert (ignored.token_ids, ignored.finish_reason) == (ref_tokens, "length")


def test_eos_from_the_model_config(tiny_model_variant, tiny_engine_factory, tmp_path) -> None:
    """Any id in config.json's eos_token_id list ends generation."""
    folder = shutil.copytree(tiny_model_variant("gqa"), tmp_path / "tiny-eos")
    engine = tiny_engine_factory(folder, block_size=4)
    ref_tokens, _ = reference_greedy(engine, engine.encode_prompt(STOP_PROMPT), 12)
    eos = ref_tokens[6]
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [2, eos]
    (folder / "config.json").write_text(json.dumps(config))
    engine = tiny_engine_factory(folder, block_size=4)
    (out,) = engine.generate([STOP_PROMPT], SamplingParams(max_tokens=12, temperature=0))
    assert out.token_ids == ref_tokens[:ref_tokens.index(eos) + 1]
    assert out.finish_reason == "stop"


def test_max_tokens_ends_with_length(lively_engine) -> None:
    (out,) = lively_engine.generate([STOP_PROMPT], SamplingParams(max_tokens=5, temperature=0))
    assert (len(out.token_ids), out.finish_reason, out.stop_reason) == (5, "length", None)
