"""worker/image_processor.py gives the pixels of transformers' Idefics3ImageProcessorPil, bit for bit:
for images wider, taller, smaller and larger than the tiles, past the processor's side cap, of
every PIL mode a request may carry (transparency composited onto white), with and without
splitting, and with another resample filter, rescale factor, mean and std."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kvweave.vision_prompt import VisionSpec, tile_grid
from worker.image_processor import ImageProcessor

SMOLVLM = {"do_image_splitting": True, "size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512},
           "resample": 1, "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "do_pad": True}
"""SmolVLM-256M-Instruct's preprocessor_config.json (its processing keys)."""
CONFIGS = {
    "smolvlm": SMOLVLM,
    "small-tiles": SMOLVLM | {"size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32}},
    "no-splitting": SMOLVLM | {"do_image_splitting": False},
    "bicubic-imagenet": SMOLVLM | {"size": {"longest_edge": 200}, "max_image_size": {"longest_edge": 64},
                                   "resample": 3, "rescale_factor": 0.004, "image_mean": [0.485, 0.456, 0.406],
                                   "image_std": [0.229, 0.224, 0.225]},
    "no-resize": SMOLVLM | {"do_resize": False, "max_image_size": {"longest_edge": 48}},
}


def _image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size=(height, width), dtype=np.uint16))
    if mode == "P-transparent":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 3
        return image
    return rgba.convert(mode)


def _spec(config: dict) -> VisionSpec:
    return VisionSpec.from_config({"vision_config": {"image_size": 512, "patch_size": 16}}, config)


@pytest.fixture(scope="module")
def transformers_processor():
    transformers = pytest.importorskip("transformers")
    return lambda config: transformers.Idefics3ImageProcessorPil(**config)


SIZES = [(640, 480), (300, 700), (20, 13), (512, 512), (5000, 40), (1, 1)]
CASES = [(name, size) for name in CONFIGS for size in (SIZES[:2] if name == "smolvlm" else SIZES)]
"""SmolVLM's own settings on two sizes only: every image becomes 2048 pixels wide, 12 tiles (slow)."""


@pytest.mark.parametrize("name, size", CASES, ids=[f"{n}-{w}x{h}" for n, (w, h) in CASES])
def test_pixels_equal_transformers(transformers_processor, name, size):
    _check(transformers_processor, CONFIGS[name], size, "RGB")


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P-transparent", "CMYK", "I;16"])
def test_every_mode_is_made_rgb_as_transformers_does(transformers_processor, mode):
    _check(transformers_processor, CONFIGS["small-tiles"], (70, 50), mode)


def _check(transformers_processor, config: dict, size: tuple[int, int], mode: str) -> None:
    image = _image(mode, *size, seed=size[0] * 7 + size[1])
    ours, rows, cols = ImageProcessor.from_config(_spec(config), config)(image)
    theirs = transformers_processor(config)(images=[[image]], return_row_col_info=True)
    assert (rows, cols) == (theirs["rows"][0][0], theirs["cols"][0][0]) == tile_grid(_spec(config), *size)
    want = np.asarray(theirs["pixel_values"])[0, :rows * cols + 1]
    assert ours.dtype == np.float32 and ours.shape == want.shape
    assert np.array_equal(ours, want)


def test_a_config_without_three_channel_values_is_refused():
    with pytest.raises(ValueError, match="image_mean needs 3 values"):
        ImageProcessor.from_config(_spec(SMOLVLM), SMOLVLM | {"image_mean": [0.5, 0.5]})
