"""A request's images on the worker: check the placeholders, preprocess, encode, map back at forward.

- `ImageEncoder.check(token_ids, images)` checks that the prompt's placeholder ids (ids >=
  vocab_size) are exactly those of the request's images, in order (kvweave/vision_prompt.py:
  a prompt cannot name an image it does not carry), and returns `PendingImages`; once each image's
  embeddings are known (worker/embedding_stage.py: this worker's caches, a peer, or `encode`),
  `PendingImages.assemble` makes the `MultimodalInputs`: the embeddings of all placeholder positions
  in prompt order and, per prompt position, the row of its embedding (-1 for text). `prepare` does
  both with every image encoded here.
- Preprocessing (resize, tile split + global image, rescale, normalize) is worker/image_processor.py,
  built from the checkpoint's preprocessor_config.json: the pixels of transformers'
  Idefics3ImageProcessorPil, without importing transformers.
- Encoder outputs are kept per image content hash in a small LRU (`EMBEDDING_CACHE_IMAGES`): a
  repeated image is not encoded again on this worker. The cluster-wide embedding cache (the tiered
  store, kvstore/embeddings.py) keys by the same hash.
"""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvweave.errors import InvalidRequestError
from kvweave.model_files import read_json
from kvweave.images import HARD_LIMITS, ImageInput, ImageLimits, inspect_image
from kvweave.vision_prompt import VisionSpec, num_tiles, placeholder_id
from worker.image_processor import ImageProcessor
from worker.vision import VisionArgs, VisionTower

logger = logging.getLogger(__name__)

EMBEDDING_CACHE_IMAGES = 64
"""Images whose encoder output a worker keeps (LRU, by content hash)."""


@dataclass(slots=True)
class MultimodalInputs:
    """What the model runner needs to put a request's images into its forward."""

    embeds: torch.Tensor
    """[num placeholder positions, dim] on the model's device, in prompt order."""
    rows: np.ndarray
    """int64 [prompt length]: the row of `embeds` for each prompt position, -1 for text."""


@dataclass(slots=True)
class PendingImages:
    """A request's images, checked against its placeholders, before their embeddings are known."""

    images: list[ImageInput]
    rows: np.ndarray
    """int64 [prompt length]: the row of the images' concatenated embeddings per position, -1 for text."""

    def assemble(self, embeds: list[torch.Tensor]) -> MultimodalInputs:
        """The `MultimodalInputs` from each image's embeddings, in order."""
        return MultimodalInputs(torch.cat(embeds), self.rows)


class ImageEncoder:
    """Preprocess and encode a request's images with the checkpoint's processor and vision tower."""

    def __init__(self, tower: VisionTower, spec: VisionSpec, folder: Path, limits: ImageLimits | None = None) -> None:
        self.tower, self.spec = tower, spec
        self.limits = limits or HARD_LIMITS
        self.processor = ImageProcessor.from_config(spec, read_json(Path(folder) / "preprocessor_config.json"))
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # requests are made (and their images encoded) on any thread
        if tower.args.image_seq_len != spec.image_seq_len:
            raise ValueError(f"image_seq_len {spec.image_seq_len} != the vision tower's {tower.args.image_seq_len}")

    def prepare(self, token_ids: list[int], images: list[bytes] | list[ImageInput]) -> MultimodalInputs | None:
        """The request's `MultimodalInputs` (None without images), every image encoded here;
        InvalidRequestError when its placeholders and images do not match."""
        pending = self.check(token_ids, images)
        if pending is None:
            return None
        return pending.assemble([self.encode(img) for img in pending.images])

    def check(self, token_ids: list[int], images: list[bytes] | list[ImageInput]) -> PendingImages | None:
        """Check that the prompt's placeholders are exactly those of its images (cheap: no pixel is
        decoded); None without images. InvalidRequestError when they do not match."""
        ids = np.asarray(token_ids, dtype=np.int64)
        is_image = ids >= self.spec.vocab_size
        if not images:
            if is_image.any():
                raise InvalidRequestError(f"prompt token ids must be in [0, {self.spec.vocab_size}) "
                                          "(image placeholders need their images)")
            return None
        checked = [img if isinstance(img, ImageInput) else inspect_image(img, f"image {k}", self.limits)
                   for k, img in enumerate(images)]
        expected = np.concatenate([np.full(num_tiles(self.spec, img) * self.spec.image_seq_len,
                                           placeholder_id(self.spec, img), dtype=np.int64) for img in checked])
        if int(is_image.sum()) != len(expected) or not np.array_equal(ids[is_image], expected):
            raise InvalidRequestError("the prompt's image placeholders do not match its images (their number, "
                                      "order or tiles)")
        rows = np.full(len(ids), -1, dtype=np.int64)
        rows[is_image] = np.arange(len(expected))
        return PendingImages(checked, rows)

    def embed_shape(self, image: ImageInput) -> tuple[int, int]:
        """[tokens, dim] of an image's embeddings."""
        return num_tiles(self.spec, image) * self.spec.image_seq_len, self.tower.args.text_dim

    def cached(self, key: bytes) -> torch.Tensor | None:
        """The embeddings under `key` (`kvstore.keys.embedding_key`: the image and the tenant's
        namespace, so one tenant's request never hits, or times, another's) if this worker's LRU holds them."""
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
            return cached

    def remember(self, key: bytes, embeds: torch.Tensor) -> None:
        with self._lock:
            self._cache[key] = embeds
            if len(self._cache) > EMBEDDING_CACHE_IMAGES:
                self._cache.popitem(last=False)

    def encode(self, image: ImageInput, key: bytes) -> torch.Tensor:
        """[tiles * image_seq_len, dim] embeddings of one image (in the LRU under its embedding `key`)."""
        cached = self.cached(key)
        if cached is not None:
            return cached
        embeds = self.tower.encode(self.pixel_values(image))  # outside the lock: a hit never waits for an encode
        self.remember(key, embeds)
        return embeds

    def pixel_values(self, image: ImageInput) -> torch.Tensor:
        """[tiles, 3, S, S]: the image's tiles (row by row) then the global image, normalized."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(image.data)) as img:
                img.load()
                size = img.size
                pixels, _, _ = self.processor(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise InvalidRequestError(f"the image cannot be decoded: {str(e)[:100]}") from None
        if size != (image.width, image.height):  # the prompt's tiles were counted from the header's size
            raise InvalidRequestError(f"the image decodes as {size[0]}x{size[1]}, its header says "
                                      f"{image.width}x{image.height}")
        return torch.from_numpy(pixels)


def build_image_encoder(vision, dtype: torch.dtype, device: torch.device) -> ImageEncoder:
    """The `ImageEncoder` of a checkpoint's `VisionCheckpoint` (worker/loader.py); random weights
    when it has none (load_format dummy)."""
    args = VisionArgs.from_hf_config(vision.config)
    if vision.weights:
        with torch.device("meta"):
            tower = VisionTower(args, dtype)
        tower.load_weights(vision.weights, device)
    else:  # the same random weights in every process (an encode worker's output is used by others)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tower = VisionTower(args, dtype).to(device)
    tower.eval()
    return ImageEncoder(tower, vision.spec, vision.folder)
