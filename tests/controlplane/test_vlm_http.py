"""Images over the OpenAI chat API through a real router and a real worker (tiny Idefics3 model):
the output equals the engine's own, the router's prompt tokens equal the worker's (so its block
hashes tell images apart), the same image hits the worker's prefix cache, and bad input gets
clear 400s with JSON bodies."""
from __future__ import annotations

import base64

import pytest

from kvweave.sampling_params import SamplingParams
from tests.controlplane.test_http_frontend import assert_openai_error, post
from tests.inprocess_cluster import InProcessCluster
from tests.vlm_models import data_url, image_part, make_png

MAX_BYTES = 4096


@pytest.fixture(scope="module")
def vlm_cluster(redis_server, tiny_vlm_model):
    c = InProcessCluster(redis_server.url, tiny_vlm_model, num_workers=1).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def router(vlm_cluster):
    return vlm_cluster.add_router(router_config={"max_images_per_request": 2, "max_image_bytes": MAX_BYTES,
                                                 "max_image_pixels": 80 * 80})


def flat_png(width: int, height: int) -> bytes:
    """A one-colour PNG: a few hundred bytes whatever its size."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def body(*parts, max_tokens: int = 6) -> dict:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p if isinstance(p, dict) else image_part(p)
               for p in parts]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}


def test_image_chat_equals_engine(router, tiny_engine_factory, tiny_vlm_model):
    img = make_png(40, 24, seed=11)
    resp = post(router, "/v1/chat/completions", body("Describe ", img, " please"))
    assert resp.status_code == 200, resp.text
    engine = tiny_engine_factory(tiny_vlm_model)
    want = engine.generate([{"messages": body("Describe ", img, " please")["messages"]}],
                           SamplingParams(temperature=0.0, max_tokens=6))[0]
    assert resp.json()["choices"][0]["message"]["content"] == want.text
    assert resp.json()["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    # the router made the worker's token ids, placeholders included
    ids, _, images = router.router.encode_prompt_images(_input(body("Describe ", img, " please")))
    assert ids == want.prompt_token_ids and [i.data for i in images] == [img]


def _input(b: dict):
    from controlplane.openai_api import parse_chat

    return parse_chat(b, "")[0]


def test_same_image_hits_cache_over_http(router):
    img = make_png(36, 36, seed=12)
    first = post(router, "/v1/chat/completions", body("Look at ", img, " first."))
    again = post(router, "/v1/chat/completions", body("Look at ", img, " again."))
    other = post(router, "/v1/chat/completions", body("Look at ", make_png(36, 36, seed=12, poke=(5, 5)), " again."))
    assert first.status_code == again.status_code == other.status_code == 200
    cached = lambda r: r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]  # noqa: E731
    ids = router.router.encode_prompt_images(_input(body("Look at ", img, " again.")))[0]
    vocab = router.router.model.vision.vocab_size
    last_image = max(i for i, t in enumerate(ids) if t >= vocab)
    assert cached(again) >= last_image // 16 * 16 > 0  # every full block through the image
    assert cached(other) == 0  # one pixel apart: nothing past the short text prefix (under one block)


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not base64"}}, "not valid base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}, "malformed image URL"),
    ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}, "malformed image URL"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "http(s) image URLs are disabled"),
    ({"type": "image_url", "image_url": {"url": data_url(b"GIF89a....", "image/gif")}}, "unsupported image type"),
    ({"type": "image_url", "image_url": {"url": data_url(b"not an image at all")}}, "not an image of a supported"),
    ({"type": "image_url", "image_url": {"url": data_url(make_png(8, 8, fmt="BMP"))}}, "unsupported image format BMP"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        make_png(8, 8)[:30]).decode()}}, "not an image of a supported"),
    ({"type": "image_url", "image_url": {"url": data_url(make_png(24, 24)[:-200])}}, "cannot be decoded"),
    ({"type": "image_url", "image_url": {"url": data_url(make_png(64, 64, seed=1))}}, "allowed"),
    ({"type": "image_url", "image_url": {}}, "non-empty string"),
    ({"type": "image_url", "image_url": {"url": data_url(flat_png(81, 80))}}, "81x80 pixels; at most 6400"),
], ids=["bad-base64", "not-base64-url", "other-scheme", "http", "gif-mime", "garbage", "bmp", "header-only",
        "truncated",
        "oversized", "no-url",
        "too-many-pixels"])
def test_bad_image_inputs_get_400(router, part, message):
    resp = post(router, "/v1/chat/completions", body("What is ", part))
    assert_openai_error(resp, 400, message)


def test_too_many_images(router):
    imgs = [make_png(8, 8, seed=s) for s in range(3)]
    assert_openai_error(post(router, "/v1/chat/completions", body(*imgs)), 400, "at most 2 are allowed")


def test_an_image_near_the_default_size_limit_fits_the_default_body_limit(vlm_cluster):
    """6 MiB of noise (8 MiB in its data URL) under the router's default limits: served, not 413."""
    router = vlm_cluster.add_router()
    img = make_png(1460, 1440, seed=4)
    assert 6 << 20 < len(img) < 7 << 20
    resp = post(router, "/v1/chat/completions", body("Describe ", img, max_tokens=1))
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] > 0


def test_image_to_text_only_model(cluster):
    router = cluster.add_router()
    resp = post(router, "/v1/chat/completions", body("Hi ", make_png(8, 8)))
    assert_openai_error(resp, 400, "does not take images")


def test_sdk_image_parts_over_grpc(router):
    """The SDK's equivalent: content parts with image bytes (or an OpenAI data URL) over gRPC give
    the HTTP API's output; bad image bytes are an InvalidRequest."""
    import kvweave

    img = make_png(40, 24, seed=11)
    http = post(router, "/v1/chat/completions", body("Describe ", img, " please")).json()
    with kvweave.Client(router.grpc_address, timeout=60, max_retries=0) as client:
        for part in ({"type": "image", "data": img}, image_part(img)):
            messages = [{"role": "user", "content": [{"type": "text", "text": "Describe "}, part,
                                                     {"type": "text", "text": " please"}]}]
            reply = client.chat(messages, max_tokens=6, temperature=0)
            assert reply.text == http["choices"][0]["message"]["content"]
        with pytest.raises(kvweave.InvalidRequest, match="not an image"):
            client.chat([{"role": "user", "content": [{"type": "image", "data": b"junk"}]}], max_tokens=2)


def test_detokenize_takes_back_what_tokenize_gives_for_an_image_chat(router):
    """/tokenize of an image chat gives placeholder ids past the vocabulary; /detokenize shows them
    as the model's image token, and still refuses ids that are neither."""
    msg = body("Look at ", make_png(30, 30, seed=13), " now.")
    tokens = post(router, "/tokenize", {"messages": msg["messages"]})
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    vision = router.router.model.vision
    assert any(t >= vision.vocab_size for t in ids)
    text = post(router, "/detokenize", {"tokens": ids})
    assert text.status_code == 200, text.text
    image_token = router.router.tokenizer.decode([vision.image_token_id], skip_special_tokens=False)
    assert image_token in text.json()["prompt"] and "Look at" in text.json()["prompt"]
    assert_openai_error(post(router, "/detokenize", {"tokens": [vision.vocab_size + 2**30]}), 400,
                        "or image placeholders", "tokens")
