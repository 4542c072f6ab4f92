"""A vision-language model (Idefics3 / SmolVLM shape) served colocated: greedy outputs equal
transformers' `Idefics3ForConditionalGeneration.generate` on the same random weights (fp32), prompt
token ids equal Idefics3Processor's, images one pixel apart never share KV, the same image hits the
prefix cache, and bad inputs are refused."""
from __future__ import annotations

import io

import pytest
import torch

from kvstore.keys import hash_blocks
from kvweave.errors import InvalidRequestError
from kvweave.sampling_params import SamplingParams
from tests.vlm_models import LONGEST_EDGE, image_part, make_png

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BS = 16


@pytest.fixture(scope="module")
def engine(tiny_engine_factory, tiny_vlm_model):
    return tiny_engine_factory(tiny_vlm_model, block_size=BS)


@pytest.fixture(scope="module")
def reference(tiny_vlm_model):
    """(processor, model) of transformers on the same checkpoint."""
    from transformers import (Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
                              PreTrainedTokenizerFast)

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_vlm_model / "tokenizer.json"))
    processor = Idefics3Processor(Idefics3ImageProcessorPil.from_pretrained(str(tiny_vlm_model)), tok, image_seq_len=4)
    model = Idefics3ForConditionalGeneration.from_pretrained(str(tiny_vlm_model), dtype=torch.float32).eval()
    return processor, model


def chat(*parts) -> dict:
    content = [{"type": "text", "text": p} if isinstance(p, str) else image_part(p) for p in parts]
    return {"messages": [{"role": "user", "content": content}]}


def hf_text(*parts) -> str:
    body = "".join(p if isinstance(p, str) else "<image>" for p in parts)
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("parts", [
    ("Describe ", make_png(40, 24, seed=1), " please"),
    ("Compare ", make_png(20, 50, seed=2), " and ", make_png(64, 64, seed=3), "?"),
    (make_png(10, 10, seed=4), "What is it?"),
], ids=["one-image", "two-images", "image-first"])
def test_greedy_equals_transformers(engine, reference, parts):
    from PIL import Image

    processor, model = reference
    images = [Image.open(io.BytesIO(p)) for p in parts if isinstance(p, bytes)]
    enc = processor(text=[hf_text(*parts)], images=[images], return_tensors="pt")
    req = engine.make_request(chat(*parts))
    spec = engine.images.spec
    ids = [spec.image_token_id if t >= spec.vocab_size else t for t in req.prompt_token_ids]
    assert ids == enc["input_ids"][0].tolist()  # the prompt expansion is Idefics3Processor's
    out = engine.generate([chat(*parts)], GREEDY)[0]
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    assert out.token_ids == want


def image_start(token_ids: list[int], vocab: int) -> int:
    """Index of the first token of the image (its `<fake_token_around_image>`, right before a placeholder)."""
    return next(i for i, t in enumerate(token_ids) if t >= vocab) - 2


def test_images_one_pixel_apart_share_no_kv(engine):
    base = make_png(40, 24, seed=5)
    variants = [base] + [make_png(40, 24, seed=5, poke=(x, y)) for x, y in [(0, 0), (39, 23), (17, 9)]]
    vocab = engine.args.vocab_size
    prompts = [chat("Tell me about ", img, " now") for img in variants]
    reqs = [engine.make_request(p) for p in prompts]
    ids = [r.prompt_token_ids for r in reqs]
    prefix = image_start(ids[0], vocab)
    assert len({tuple(i) for i in ids}) == len(ids)
    hashes = [hash_blocks(i, BS, reqs[0].cache_extra) for i in ids]
    first_image_block = prefix // BS
    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            assert hashes[a][:first_image_block] == hashes[b][:first_image_block]  # the text before: shared
            assert not set(hashes[a][first_image_block:]) & set(hashes[b][first_image_block:])
    fresh = []
    for p in prompts:
        fresh.append(engine.generate([p], GREEDY)[0])
    for out in fresh[1:]:  # each after the others ran: only the text before the image may come from the cache
        assert out.num_cached_tokens <= prefix // BS * BS


def test_same_image_hits_prefix_cache(engine):
    img = make_png(30, 30, seed=6)
    first = engine.generate([chat("Look at ", img, " and describe it.")], GREEDY)[0]
    again = engine.generate([chat("Look at ", img, " and name its colours.")], GREEDY)[0]
    vocab = engine.args.vocab_size
    last_image = max(i for i, t in enumerate(first.prompt_token_ids) if t >= vocab)
    assert again.num_cached_tokens >= last_image // BS * BS
    assert again.num_cached_tokens > image_start(first.prompt_token_ids, vocab)


def test_token_ids_with_images_beside(engine):
    """The worker API's form: token ids with placeholders plus the image bytes (as the router sends)."""
    img = make_png(40, 24, seed=1)
    prompt = chat("Describe ", img, " please")
    ids = engine.make_request(prompt).prompt_token_ids
    want = engine.generate([prompt], GREEDY)[0].token_ids
    req_id = engine.add_request(ids, GREEDY, images=[img])
    final = None
    while engine.has_unfinished():
        final = next((o for o in engine.step() if o.req_id == req_id and o.finished), final)
    assert final.token_ids == want
    other = make_png(40, 24, seed=1, poke=(1, 1))
    with pytest.raises(InvalidRequestError, match="placeholders do not match"):
        engine.make_request(ids, GREEDY, images=[other])
    with pytest.raises(InvalidRequestError, match="need their images"):
        engine.make_request(ids, GREEDY)
    with pytest.raises(InvalidRequestError, match="chunks cannot be combined with images"):
        engine.make_request(ids, GREEDY, chunk_spans=[(1, 3)], images=[img])


def test_tile_grid_matches_processor(engine):
    """The router's tile arithmetic (from the header alone) equals the processor's for odd sizes."""
    from kvweave.images import ImageLimits, inspect_image

    for w, h in [(1, 1), (33, 7), (7, 33), (64, 63), (100, 3), (LONGEST_EDGE + 1, 31), (500, 499)]:
        img = inspect_image(make_png(w, h, seed=w), "image", ImageLimits())
        engine.images.pixel_values(img)  # asserts the processor's rows/cols equal tile_grid's


def test_text_only_model_refuses_images(tiny_engine_factory):
    engine = tiny_engine_factory()
    with pytest.raises(InvalidRequestError, match="does not take images"):
        engine.make_request(chat("Hi ", make_png(8, 8)))


def test_image_split_across_prefill_chunks(tiny_engine_factory, tiny_vlm_model, engine):
    """A step budget of 8 tokens cuts the images' placeholders across many prefill chunks (and mixes
    them with another request's decodes): the same greedy tokens."""
    small = tiny_engine_factory(tiny_vlm_model, block_size=BS, max_num_batched_tokens=8)
    prompts = [chat("Compare ", make_png(20, 50, seed=2), " and ", make_png(64, 64, seed=3), "?"),
               chat("Describe ", make_png(40, 24, seed=1), " please")]
    assert [o.token_ids for o in small.generate(prompts, GREEDY)] == \
        [o.token_ids for o in engine.generate(prompts, GREEDY)]


def test_smolvlm_chat_template(tiny_engine_factory, tiny_vlm_model, reference, tmp_path):
    """SmolVLM's template iterates content parts (string content would vanish): the prompt ids equal
    Idefics3Processor's on the text transformers renders, and so do the greedy tokens."""
    import jinja2
    from PIL import Image

    from tests.vlm_models import SMOLVLM_TEMPLATE, with_smolvlm_template

    engine = tiny_engine_factory(with_smolvlm_template(tiny_vlm_model, tmp_path / "smolvlm"))
    img = make_png(40, 24, seed=7)
    parts = [{"type": "text", "text": "Can you describe "}, {"type": "image"}, {"type": "text", "text": " briefly?"}]
    text = jinja2.Template(SMOLVLM_TEMPLATE).render(messages=[{"role": "user", "content": parts}],
                                                    add_generation_prompt=True)
    processor, model = reference
    enc = processor(text=[text], images=[[Image.open(io.BytesIO(img))]], return_tensors="pt")
    prompt = chat("Can you describe ", img, " briefly?")
    spec = engine.images.spec
    ids = [spec.image_token_id if t >= spec.vocab_size else t for t in engine.make_request(prompt).prompt_token_ids]
    assert ids == enc["input_ids"][0].tolist()
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    assert engine.generate([prompt], GREEDY)[0].token_ids == want
    text_only = engine.make_request({"messages": [{"role": "user", "content": "Hello there"}]}).prompt_token_ids
    assert engine.tokenizer.decode(text_only, skip_special_tokens=False) == \
        "<|im_start|>User: Hello there<end_of_utterance>\nAssistant:"


def test_vision_tower_equals_transformers_at_scale_factor_4():
    """worker/vision.py against transformers' vision tower and connector at SmolVLM-256M's pixel
    shuffle (scale factor 4) on a small random config: the same embeddings (fp32, 1e-5)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from worker.vision import VisionArgs, VisionTower

    cfg = Idefics3Config(vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=3, image_size=64, patch_size=8),
                         text_config=dict(model_type="llama", hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64),
                         scale_factor=4)
    torch.manual_seed(0)
    hf = Idefics3ForConditionalGeneration(cfg).eval()
    weights = {k: v for k, v in hf.state_dict().items() if k.startswith(("model.vision_model.", "model.connector."))}
    with torch.device("meta"):
        tower = VisionTower(VisionArgs.from_hf_config(cfg.to_dict()))
    tower.load_weights(weights, "cpu")
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = hf.model.get_image_features(pixels[None]).pooler_output[0]
    assert tower.args.image_seq_len == 4
    torch.testing.assert_close(tower.encode(pixels), want, rtol=1e-5, atol=1e-5)
