"""Idefics3's image preprocessing in PIL and numpy: the pixels of transformers' Idefics3ImageProcessorPil.

An image is made RGB (transparent parts composited onto white), its longest side resized to
`size.longest_edge`, resized again to multiples of the tile side and cut into tiles, row by row,
followed by the whole image resized to one tile (the global image); without splitting, only the
global image. Each is rescaled (`rescale_factor`, in float64, then float32) and normalized
(`image_mean`, `image_std`, in float32), the arithmetic transformers does, so the values are
bit-identical (tests/worker/test_image_processor.py checks them against transformers). The sizes
come from kvweave/vision_prompt.py, which the router uses to count an image's prompt tokens.

transformers' processor is not imported: its import pulls in torch's compiler stack (~4 s and
~180 MB more resident memory in every vision worker).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from kvweave.vision_prompt import VisionSpec, resized_sizes, tile_grid

__all__ = ["ImageProcessor"]


@dataclass(frozen=True)
class ImageProcessor:
    spec: VisionSpec
    """The resize and tile settings (`do_resize`, `size`, `max_image_size`, `do_image_splitting`)."""
    resample: int = Image.Resampling.LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, spec: VisionSpec, processor: dict) -> "ImageProcessor":
        """From a checkpoint's preprocessor_config.json (absent keys: Idefics3's defaults)."""
        d = cls(spec)

        def channels(key: str, default: tuple[float, ...]) -> tuple[float, ...]:
            value = processor.get(key, default)
            value = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
            if len(value) != 3:
                raise ValueError(f"preprocessor_config.json: {key} needs 3 values (RGB), got {len(value)}")
            return value

        return cls(spec, resample=int(processor.get("resample", d.resample)),
                   do_rescale=bool(processor.get("do_rescale", True)),
                   rescale_factor=float(processor.get("rescale_factor", d.rescale_factor)),
                   do_normalize=bool(processor.get("do_normalize", True)),
                   image_mean=channels("image_mean", d.image_mean), image_std=channels("image_std", d.image_std))

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, int, int]:
        """(pixel values [tiles + 1, 3, S, S] float32, rows, cols): the tiles row by row, then the
        global image; (rows, cols) is (0, 0) when there is only the global image."""
        image, t = _rgb(image), self.spec.tile_size
        (first, tiled), (rows, cols) = resized_sizes(self.spec, *image.size), tile_grid(self.spec, *image.size)
        frames = []
        if self.spec.do_resize:
            image = self._resize(image, first)
        if not self.spec.do_image_splitting:
            image = self._resize(image, (t, t))
        else:
            image = self._resize(image, tiled)
            if rows:  # more than one tile: the tiles, then the whole image as one tile
                pixels = np.asarray(image)
                frames = [pixels[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(cols)]
                image = self._resize(image, (t, t))
        frames.append(np.asarray(image))
        values = np.stack(frames).transpose(0, 3, 1, 2)  # [frames, 3, S, S] uint8
        if self.do_rescale:
            values = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            values = values.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            values = (values - mean) / std
        return values, rows, cols

    def _resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        height, width = size
        return image.resize((width, height), resample=self.resample)


def _rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")
