"""The multimodal workload: deterministic images (same seed, same bytes; distinct images differ and
decode to their drawn sizes), popularity, text share, request classes, the request shapes of both
backends, and its option checks."""
from __future__ import annotations

import base64
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from kvweave.client_types import build_request
from loadgen_helpers import workload_sessions
from loadgen.backends import openai_message
from loadgen.types import Session, WorkloadError
from loadgen.workloads.multimodal import make_image

SMALL = ["--workload", "multimodal", "--image-size", "24x16:48x40"]


def take(*argv: str, n: int = 40) -> list[Session]:
    return workload_sessions(*SMALL, *argv, n=n)


def images_of(session: Session) -> list[bytes]:
    content = session.turns[0].messages[0]["content"]
    return [] if isinstance(content, str) else [p["data"] for p in content if p["type"] == "image"]


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_same_seed_same_bytes_other_seed_other_images():
    a = take("--images-per-request", "1:3", "--seed", "3")
    make_image.cache_clear()  # made again, not the kept bytes
    b = take("--images-per-request", "1:3", "--seed", "3")
    assert [s.turns for s in a] == [s.turns for s in b] and [s.tags for s in a] == [s.tags for s in b]
    other = take("--images-per-request", "1:3", "--seed", "4")
    assert not {png for s in a for png in images_of(s)} & {png for s in other for png in images_of(s)}


def test_distinct_images_differ_and_decode_to_their_sizes():
    sessions = take("--num-images", "40", "--image-skew", "0", n=200)
    by_index = {i: png for s in sessions for i, png in zip(s.tags["images"], images_of(s))}
    assert len(by_index) == 40  # 200 uniform draws reach every image
    pixels = {i: decode(png) for i, png in by_index.items()}
    assert len({p.tobytes() for p in pixels.values()}) == 40  # the decoded pictures differ, not just the files
    sizes = {p.shape[:2] for p in pixels.values()}
    assert all(16 <= h <= 40 and 24 <= w <= 48 for h, w in sizes) and len(sizes) > 10
    assert all(p.std() > 10 for p in pixels.values())  # a picture, not a flat colour
    fixed = take("--image-size", "33x17", n=5)
    assert {decode(png).shape for s in fixed for png in images_of(s)} == {(17, 33, 3)}


def test_popularity_skew_makes_images_recur():
    def counts(skew: str) -> Counter:
        return Counter(i for s in take("--num-images", "50", "--image-skew", skew, n=300) for i in s.tags["images"])

    skewed, uniform = counts("2"), counts("0")
    assert skewed.most_common(1)[0][1] > 100  # p(top) = 1 / sum 1/k^2 ~ 0.62 of 300
    assert uniform.most_common(1)[0][1] < 30  # 6 expected per image
    assert len(skewed) < len(uniform)
    extreme = take("--num-images", "5", "--images-per-request", "3", "--image-skew", "5000", n=4)
    assert all(len(set(s.tags["images"])) == 3 for s in extreme)  # all weight on one image: still 3 distinct


def test_classes_images_per_request_and_text_share():
    sessions = take("--num-images", "6", "--images-per-request", "1:3", "--text-share", "0.25", n=80)
    seen = set()
    for s in sessions:
        images = s.tags["images"]
        assert len(images) == len(set(images)) and len(images_of(s)) == len(images)
        if not images:
            assert s.tags["class"] == "text" and isinstance(s.turns[0].messages[0]["content"], str)
            continue
        assert 1 <= len(images) <= 3
        assert s.tags["class"] == ("image_repeat" if images in seen else "image_first")
        assert s.turns[0].messages[0]["content"][-1]["type"] == "text"
        seen.add(images)
    classes = Counter(s.tags["class"] for s in sessions)
    assert classes["text"] == 20 and classes["image_first"] and classes["image_repeat"]
    assert {len(s.tags["images"]) for s in sessions} == {0, 1, 2, 3}
    for window in range(0, 80, 8):  # spread evenly: 2 text requests in any 8 consecutive ones
        assert sum(s.tags["class"] == "text" for s in sessions[window:window + 8]) == 2
    assert all(s.turns[0].max_tokens == 128 for s in sessions)
    assert {s.turns[0].max_tokens for s in take("--output-len", "5", n=3)} == {5}


def test_request_shapes_of_both_backends():
    session = next(s for s in take("--images-per-request", "2") if s.tags["class"] == "image_first")
    message, pngs = session.turns[0].messages[0], images_of(session)
    # gRPC: the SDK's image parts travel as the image bytes
    request = build_request(prompt=None, messages=[message], token_ids=None, segments=None, sampling={},
                            session_id=None, tenant=None, request_id=None, model=None)
    parts = request.chat.messages[0].parts
    assert [p.image for p in parts[:2]] == pngs and parts[2].text == message["content"][2]["text"]
    # OpenAI: image_url parts with base64 PNG data URLs, in the same order, the text unchanged
    http = openai_message(message)
    assert [p["type"] for p in http["content"]] == ["image_url", "image_url", "text"]
    urls = [p["image_url"]["url"] for p in http["content"][:2]]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == pngs
    assert http["content"][2] == message["content"][2] and message["content"][0]["type"] == "image"  # not changed


def test_text_messages_go_unchanged():
    text = {"role": "user", "content": "Write a haiku about the sea."}
    parts = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    assert openai_message(text) is text and openai_message(parts) is parts


@pytest.mark.parametrize("argv, message", [
    (["--num-images", "0"], "--num-images must be at least 1, got 0"),
    (["--images-per-request", "0"], "--images-per-request 0: need 1 <= LO <= HI"),
    (["--images-per-request", "3:2"], "--images-per-request 3:2: need 1 <= LO <= HI"),
    (["--images-per-request", "two"], "--images-per-request must be N or LO:HI with integers, got 'two'"),
    (["--num-images", "2", "--images-per-request", "1:3"], "--images-per-request 3 is more than --num-images 2"),
    (["--image-size", "512"], "--image-size must be WxH or WxH:WxH with integers (e.g. 512x384), got '512'"),
    (["--image-size", "64x64:32x32"], "--image-size 64x64:32x32: need 1 <= width and height"),
    (["--image-size", "0x10"], "--image-size 0x10: need 1 <= width and height"),
    (["--image-size", "10x10:20x20:30x30"], "--image-size must be WxH or WxH:WxH"),
    (["--image-size", "9000x9000"], "is over 67108864 pixels"),
    (["--image-skew", "-1"], "--image-skew must be at least 0.0, got -1.0"),
    (["--text-share", "1.5"], "--text-share must be in [0, 1], got 1.5"),
    (["--output-len", "0"], "--output-len must be at least 1, got 0"),
])
def test_bad_options(argv, message):
    with pytest.raises(WorkloadError) as err:
        take(*argv)
    assert message in str(err.value)
