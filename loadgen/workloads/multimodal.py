"""`multimodal`: chat requests for a vision-language model, a text instruction after 1..N images,
some of them text only.

Images: `num_images` distinct pictures, each generated from (seed, its index): a coarse grid of
seeded colours scaled up smoothly to its size (drawn once per image from `image_size`), with the
index written into the top-left pixel so that distinct images always differ, encoded as PNG by
Pillow (lossless: a decoder gets these exact pixels back). The same seed makes byte-identical
images on the same installation; they are made when first needed and the recent ones kept.

Requests: a `text_share` of them are text only, spread evenly (`spread_evenly`); every other one
carries `images_per_request` distinct images drawn by popularity, p(rank) ~ 1/(rank+1)^S over a
seeded order of the images (`image_skew` S, the rag workload's popularity form), so popular images
recur. A message's content is the images as the SDK's parts ({"type": "image", "data": PNG bytes},
which the openai backend sends as `image_url` data URLs), then the instruction. Bursts of requests
come from the run's arrival options (`--request-rate` with `--burstiness` below 1), as for every
workload.

Each session's tags say its `class`: "text", "image_first" (the first request of the run with this
sequence of images) or "image_repeat" (the same images in the same order again: the server may
reuse their encoding and KV), so the report gives latency per class; and its `images` (the indices
sent), which the report counts. The classes are decided in sending order: with concurrency, a repeat
may be sent while its first is still in flight, and a server warm from an earlier run may already
hold a "first" request's images.
"""
from __future__ import annotations

import argparse
import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kvweave.config_flags import flag
from kvweave.images import HARD_MAX_PIXELS
from loadgen.types import Session, Turn, WorkloadError
from loadgen.workloads.base import at_least, check_fraction, given, make_rng, spread_evenly
from loadgen.workloads.rag import zipf_weights

IMAGE_INSTRUCTIONS = ("Describe the image in one sentence.", "What is the main colour of the picture?",
                      "Write a short caption for this image.", "List the objects you can see.")
MANY_IMAGE_INSTRUCTIONS = ("Describe each image in one sentence.", "What do these pictures have in common?",
                           "Which of the images is the brightest?", "Write a short caption for every image.")
TEXT_INSTRUCTIONS = ("Write a haiku about the sea.", "Explain what a cache is in two sentences.",
                     "Name three colours of the rainbow.", "Give a one-line summary of the water cycle.")
MAX_IMAGES = 2**24
"""Most distinct images: an image's index is written into one RGB pixel."""
_GRID = (4, 8)
"""Rows and columns of an image's colour grid are drawn from [4, 8]."""


@dataclass(frozen=True)
class MultimodalOptions:
    """Options of the `multimodal` workload."""

    num_images: int = field(default=16, metadata=flag(metavar="N"))
    """distinct images"""
    images_per_request: str = field(default="1", metadata=flag(metavar="N|LO:HI"))
    """images in a request that has any: N, or uniform in [LO, HI]; distinct within a request"""
    image_size: str = field(default="512x512", metadata=flag(metavar="WxH|WxH:WxH"))
    """pixels of each image, or a range: width and height each uniform between the two corners,
    drawn once per image"""
    image_skew: float = field(default=1.0, metadata=flag(metavar="S"))
    """image popularity p(rank) ~ 1/(rank+1)^S over a seeded order of the images (the rag workload's
    --popularity-skew form); 0 is uniform, larger makes popular images recur more"""
    text_share: float = field(default=0.0, metadata=flag(metavar="F"))
    """share of the requests that are text only, spread evenly, 0 <= F <= 1"""

    def __post_init__(self) -> None:
        check_options(self.num_images, parse_count_range(self.images_per_request),
                      parse_image_size(self.image_size), self.image_skew, self.text_share)


def parse_count_range(text: str) -> tuple[int, int]:
    """--images-per-request: `N` or `LO:HI` -> (lo, hi), 1 <= lo <= hi."""
    lo_text, sep, hi_text = str(text).partition(":")
    try:
        lo, hi = int(lo_text), int(hi_text if sep else lo_text)
    except ValueError:
        raise WorkloadError(f"--images-per-request must be N or LO:HI with integers, got {text!r}") from None
    if lo < 1 or lo > hi:
        raise WorkloadError(f"--images-per-request {text}: need 1 <= LO <= HI")
    return lo, hi


def parse_image_size(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """--image-size: `WxH` or `WxH:WxH` -> ((w_lo, h_lo), (w_hi, h_hi)), each side >= 1, lo <= hi."""
    try:
        corners = [tuple(int(v) for v in part.lower().split("x", 1)) for part in str(text).split(":")]
    except ValueError:
        corners = []
    if not 1 <= len(corners) <= 2 or any(len(c) != 2 for c in corners):
        raise WorkloadError(f"--image-size must be WxH or WxH:WxH with integers (e.g. 512x384), got {text!r}")
    lo, hi = corners[0], corners[-1]
    if min(lo) < 1 or lo[0] > hi[0] or lo[1] > hi[1]:
        raise WorkloadError(f"--image-size {text}: need 1 <= width and height, the first corner <= the second")
    if hi[0] * hi[1] > HARD_MAX_PIXELS:
        raise WorkloadError(f"--image-size {text}: {hi[0]}x{hi[1]} is over {HARD_MAX_PIXELS} pixels, more than "
                            "any kvweave server accepts")
    return lo, hi


def check_options(num_images: int, images_per_request: tuple[int, int],
                  image_size: tuple[tuple[int, int], tuple[int, int]], image_skew: float, text_share: float) -> None:
    """WorkloadError for options that cannot make requests (the parsers check the ranges' forms)."""
    at_least(num_images, 1, "--num-images")
    if num_images > MAX_IMAGES:
        raise WorkloadError(f"--num-images must be at most {MAX_IMAGES}, got {num_images}")
    if images_per_request[1] > num_images:
        raise WorkloadError(f"--images-per-request {images_per_request[1]} is more than --num-images {num_images} "
                            "(a request's images are distinct)")
    at_least(image_skew, 0.0, "--image-skew")
    check_fraction(text_share, "--text-share")


@functools.lru_cache(maxsize=64)
def make_image(seed: int, index: int, size: tuple[tuple[int, int], tuple[int, int]]) -> bytes:
    """The PNG bytes of image `index` of `seed`, its width and height drawn from the `size` range."""
    from PIL import Image

    rng = make_rng(seed, "multimodal-image", index)
    (w_lo, h_lo), (w_hi, h_hi) = size
    width, height = int(rng.integers(w_lo, w_hi + 1)), int(rng.integers(h_lo, h_hi + 1))
    grid = rng.integers(0, 256, size=(*rng.integers(_GRID[0], _GRID[1] + 1, size=2), 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR))
    pixels[0, 0] = [(index >> shift) & 0xFF for shift in (0, 8, 16)]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)  # 5x faster than the default 6
    return buf.getvalue()


class MultimodalWorkload:
    """One-turn chat requests: images then an instruction, or (a `text_share` of them) text only."""

    name = "multimodal"
    summary = "chat with generated images, popular ones recurring, and text-only turns (vision-language models)"
    default_output_len = 128
    options = (MultimodalOptions,)

    def __init__(self, *, num_images: int = 16, images_per_request: tuple[int, int] = (1, 1),
                 image_size: tuple[tuple[int, int], tuple[int, int]] = ((512, 512), (512, 512)),
                 image_skew: float = 1.0, text_share: float = 0.0, output_len: int = 128, seed: int = 0) -> None:
        check_options(num_images, images_per_request, image_size, image_skew, text_share)
        at_least(output_len, 1, "--output-len")
        at_least(seed, 0, "--seed")
        self.num_images, self.images_per_request, self.image_size = num_images, images_per_request, image_size
        self.image_skew, self.text_share, self.output_len, self.seed = image_skew, text_share, output_len, seed

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MultimodalWorkload:
        return cls(num_images=args.num_images, images_per_request=parse_count_range(args.images_per_request),
                   image_size=parse_image_size(args.image_size), image_skew=args.image_skew,
                   text_share=args.text_share, output_len=given(args.output_len, cls.default_output_len),
                   seed=args.seed)

    def image(self, index: int) -> bytes:
        """The PNG bytes of image `index` (0 <= index < num_images)."""
        return make_image(self.seed, index, self.image_size)

    def message(self, images: tuple[int, ...], instruction: str) -> dict:
        """The user message of a request with `images` (indices; none: text only)."""
        if not images:
            return {"role": "user", "content": instruction}
        parts = [{"type": "image", "data": self.image(i)} for i in images]
        return {"role": "user", "content": [*parts, {"type": "text", "text": instruction}]}

    def sessions(self) -> Iterator[Session]:
        rng = make_rng(self.seed, self.name)
        order = rng.permutation(self.num_images)
        with np.errstate(over="ignore"):  # a huge skew: (rank+1)^S overflows, its weight is 0
            weights = zipf_weights(self.num_images, self.image_skew)
        weights = np.maximum(weights, np.finfo(np.float64).tiny)  # so a request still gets distinct images
        lo, hi = self.images_per_request
        seen: set[tuple[int, ...]] = set()
        for i, text in enumerate(spread_evenly(self.text_share, float(rng.random()))):
            images: tuple[int, ...] = ()
            if text:
                kind, instructions = "text", TEXT_INSTRUCTIONS
            else:
                ranks = rng.choice(self.num_images, size=int(rng.integers(lo, hi + 1)), replace=False, p=weights)
                images = tuple(int(order[r]) for r in ranks)
                kind = "image_repeat" if images in seen else "image_first"
                instructions = IMAGE_INSTRUCTIONS if len(images) == 1 else MANY_IMAGE_INSTRUCTIONS
                seen.add(images)
            message = self.message(images, instructions[int(rng.integers(len(instructions)))])
            yield Session(f"{self.name}-{i}", [Turn(max_tokens=self.output_len, messages=(message,))],
                          tags={"class": kind, "images": images})
