"""Image inputs of a request: data URLs in, checked and content-hashed images out (torch-free).

The router and the worker both run this (the router to build the prompt's placeholder tokens and
route on them, the worker to check what the router sent), so it lives in the shared bottom layer
and imports only PIL. Only the image header is read here (format and size); pixels are decoded by
the worker's preprocessing (worker/multimodal.py).

An image's identity is the SHA-256 of its bytes (`ImageInput.hash`): the placeholder token ids of
its prompt positions derive from it (kvweave/vision_prompt.py), and the encoder's output for it is
keyed by it, so the prefix cache, the router's block hashes and an embedding cache all tell images
apart without a special case. Two encodings of the same picture (PNG and JPEG) are two images.

Limits (`ImageLimits`): bytes per image, pixels per image, images per request; http(s) URLs are
refused unless allowed (fetching them is not built: even then they are refused, saying so).
Every problem raises `InvalidRequestError` naming the content part.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from kvweave.errors import InvalidRequestError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP")
"""Image formats accepted (PIL's names); the MIME type of a data URL must name one of them."""
_MIME_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,(.*)", re.DOTALL)
MAX_IMAGE_BYTES = 8 * 2**20
"""Default largest encoded image (bytes)."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Default largest image (width x height), checked from the header before any decoding."""
MAX_IMAGES_PER_REQUEST = 8
"""Default most images in one request."""
HARD_MAX_BYTES, HARD_MAX_PIXELS, HARD_MAX_IMAGES = 64 * 2**20, 8192 * 8192, 64
"""Upper bounds of the configurable limits."""


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What a request's images may be."""

    max_bytes: int = MAX_IMAGE_BYTES
    """Largest encoded image."""
    max_pixels: int = MAX_IMAGE_PIXELS
    """Largest width x height."""
    max_images: int = MAX_IMAGES_PER_REQUEST
    """Most images per request."""
    allow_http_urls: bool = False
    """Accept http(s) image URLs (off by default; the router fetches them: controlplane/image_fetch.py)."""

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_images) < 1:
            raise ValueError("image limits must be positive")
        if (self.max_bytes > HARD_MAX_BYTES or self.max_pixels > HARD_MAX_PIXELS
                or self.max_images > HARD_MAX_IMAGES):
            raise ValueError(f"image limits may be at most {HARD_MAX_BYTES} bytes, {HARD_MAX_PIXELS} pixels and "
                             f"{HARD_MAX_IMAGES} images per request")


HARD_LIMITS = ImageLimits(HARD_MAX_BYTES, HARD_MAX_PIXELS, HARD_MAX_IMAGES)
"""The most any router may let through: what a worker accepts (the router applies its own, lower, limits)."""


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One checked image of a request: its bytes, content hash, format and size."""

    data: bytes
    hash: bytes
    """SHA-256 of `data` (32 bytes)."""
    format: str
    width: int
    height: int


def image_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def decode_data_url(url: str, where: str, limits: ImageLimits) -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL; http(s) URLs are refused (the router
    fetches them before this, where `allow_http_urls`: controlplane/image_fetch.py), as is anything else."""
    if not isinstance(url, str) or not url:
        raise InvalidRequestError(f"{where}: 'image_url.url' must be a non-empty string", where)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        if not limits.allow_http_urls:
            raise InvalidRequestError(f"{where}: http(s) image URLs are disabled on this server; send the image "
                                      "inline as a base64 data URL (data:image/png;base64,...)", where)
        raise InvalidRequestError(f"{where}: http(s) image URLs are fetched by the router only; send the image "
                                  "inline as a base64 data URL (data:image/png;base64,...)", where)
    m = _DATA_URL.fullmatch(url)
    if scheme != "data" or m is None:
        raise InvalidRequestError(f"{where}: malformed image URL: expected a base64 data URL "
                                  "(data:image/png;base64,...)", where)
    mime = (m.group(1) or "").lower()
    if mime not in _MIME_FORMATS:
        raise InvalidRequestError(f"{where}: unsupported image type {mime[:40]!r} (supported: "
                                  f"{', '.join(sorted(_MIME_FORMATS))})", where)
    payload = m.group(3)
    if len(payload) > 4 * (limits.max_bytes // 3 + 1) + 4:  # before decoding: base64 is 4/3 of the bytes
        raise InvalidRequestError(f"{where}: the image is larger than the {limits.max_bytes} bytes allowed", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{where}: malformed data URL: the payload is not valid base64", where) from None


def inspect_image(data: bytes, where: str, limits: ImageLimits) -> ImageInput:
    """Check one image from its header (format, size) and hash it; the pixels are not decoded."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise InvalidRequestError(f"{where}: the image is {len(data)} bytes, more than the {limits.max_bytes} "
                                  "allowed", where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(f"{where}: the data is not an image of a supported format (supported: "
                                  f"{', '.join(SUPPORTED_FORMATS)})", where) from None
    except (OSError, ValueError, SyntaxError):
        raise InvalidRequestError(f"{where}: the image data is corrupt or truncated", where) from None
    if fmt not in SUPPORTED_FORMATS:
        raise InvalidRequestError(f"{where}: unsupported image format {fmt} (supported: "
                                  f"{', '.join(SUPPORTED_FORMATS)})", where)
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise InvalidRequestError(f"{where}: the image is {width}x{height} pixels; at most {limits.max_pixels} "
                                  "pixels are allowed", where)
    return ImageInput(data, image_hash(data), fmt, width, height)


def check_image_count(n: int, limits: ImageLimits) -> None:
    if n > limits.max_images:
        raise InvalidRequestError(f"the request has {n} images; at most {limits.max_images} are allowed", "messages")
