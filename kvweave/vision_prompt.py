"""Prompts with images for Idefics3 / SmolVLM models (torch-free: the router runs it too).

`VisionSpec.from_config` reads what the prompt depends on from a checkpoint folder's files: config.json
(`model_type: idefics3`, `image_token_id`, `scale_factor`, the vision tower's `image_size` and
`patch_size`, the language model's `vocab_size`) and preprocessor_config.json (`do_image_splitting`,
`size.longest_edge`, `max_image_size.longest_edge`). A text-only checkpoint has none.

Each image becomes exactly the text Idefics3Processor puts in place of `<image>`: with splitting,
for every tile row `(<fake_token_around_image><row_r_col_c><image>*L)*cols + "\n"`, then
`"\n<fake_token_around_image><global-img><image>*L<fake_token_around_image>"`; without (or for an
image that fits one tile) only the global part. L (`image_seq_len`) is (image_size / patch_size)^2 /
scale_factor^2. The tile grid comes from the image size alone (`tile_grid`, the arithmetic of
Idefics3ImageProcessor's resize to `size.longest_edge` then to multiples of the tile size), so the
router computes it from the image header without decoding pixels.

Placeholders (SGLang's pad-value scheme): every `<image>` position of an image holds the id
`vocab_size + hash mod 2^30` (`placeholder_id`) instead of `image_token_id`, so token ids, block
hashes and the router's index differ between images and agree for the same image. The worker maps
the ids back to the image's embeddings at forward time (worker/multimodal.py).
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from kvweave.errors import InvalidRequestError
from kvweave.images import ImageInput, ImageLimits, check_image_count, decode_data_url, inspect_image
from kvweave.segments import flatten_messages, split_at_sentinels
from kvweave.tokenizer import InvalidMessagesError, Tokenizer, TokenizerError

PLACEHOLDER_RANGE = 2**30
"""Placeholder ids lie in [vocab_size, vocab_size + PLACEHOLDER_RANGE) (they fit a uint32)."""
VISION_MODEL_TYPES = ("idefics3",)
MAX_PROCESSOR_SIDE = 4096
"""Idefics3ImageProcessor's cap on a resized side (its MAX_IMAGE_SIZE)."""
FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_TOKEN = "<fake_token_around_image>", "<image>", "<global-img>"


@dataclass(frozen=True, slots=True)
class VisionSpec:
    """What an image's prompt tokens depend on."""

    vocab_size: int
    image_token_id: int
    image_seq_len: int
    """`<image>` tokens per tile."""
    tile_size: int
    """Side of a tile (max_image_size.longest_edge, the vision tower's input)."""
    longest_edge: int
    """The image's longest side is first resized to this (size.longest_edge)."""
    do_image_splitting: bool = True
    do_resize: bool = True

    @classmethod
    def from_config(cls, cfg: dict, processor: dict) -> "VisionSpec":
        vision, text = cfg.get("vision_config", {}), cfg.get("text_config", {})
        image_size, patch = vision.get("image_size", 224), vision.get("patch_size", 32)
        scale = cfg.get("scale_factor", 2)
        seq_len = int((image_size // patch) ** 2 / scale**2)
        tile = (processor.get("max_image_size") or {}).get("longest_edge", image_size)
        size = processor.get("size") or {}
        return cls(vocab_size=int(text.get("vocab_size", cfg.get("vocab_size", 0))),
                   image_token_id=int(cfg.get("image_token_id", 128257)), image_seq_len=seq_len, tile_size=int(tile),
                   longest_edge=int(size.get("longest_edge", 4 * tile)),
                   do_image_splitting=bool(processor.get("do_image_splitting", True)),
                   do_resize=bool(processor.get("do_resize", True)))


def placeholder_id(spec: VisionSpec, image: ImageInput) -> int:
    return spec.vocab_size + int.from_bytes(image.hash[:8], "big") % PLACEHOLDER_RANGE


def displayable_ids(spec: VisionSpec | None, vocab_size: int, token_ids: list[int]) -> list[int]:
    """`token_ids` with every image placeholder id (`placeholder_id`) back to the image token, so a
    prompt from /tokenize detokenizes; ValueError naming the first id that is neither."""
    out = []
    for t in token_ids:
        if 0 <= t < vocab_size:
            out.append(t)
        elif spec is not None and vocab_size <= t < vocab_size + PLACEHOLDER_RANGE:
            out.append(spec.image_token_id)
        else:
            raise ValueError(f"token id {t} is not in the vocabulary (ids are 0..{vocab_size - 1}"
                             f"{', or image placeholders' if spec is not None else ''})")
    return out


def tile_grid(spec: VisionSpec, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of tiles Idefics3ImageProcessor splits an image of this size into; (0, 0): the
    global image alone."""
    if not spec.do_image_splitting:
        return 0, 0
    _, (height, width) = resized_sizes(spec, width, height)
    t = spec.tile_size
    if height > t or width > t:
        return (height - t) // t + 1, (width - t) // t + 1
    return 0, 0


def resized_sizes(spec: VisionSpec, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width) after the resize of the longest side, (height, width) after the resize to
    multiples of the tile side): Idefics3ImageProcessor's two resizes of an image with splitting."""
    if spec.do_resize:
        height, width = _resize_to_longest(height, width, spec.longest_edge)
    first, t, aspect = (height, width), spec.tile_size, width / height
    if width >= height:
        width = math.ceil(width / t) * t
        height = math.ceil(int(width / aspect) / t) * t
    else:
        height = math.ceil(height / t) * t
        width = math.ceil(int(height * aspect) / t) * t
    return first, (height, width)


def _resize_to_longest(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Idefics3's resize of the longest side to `max_len` (even short side), then below MAX_PROCESSOR_SIDE."""
    aspect = width / height
    if width >= height:
        width, height = max_len, int(max_len / aspect)
        height += height % 2
    else:
        height, width = max_len, int(max_len * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_PROCESSOR_SIDE:
        width, height = MAX_PROCESSOR_SIDE, int(MAX_PROCESSOR_SIDE / aspect)
    elif height > width and height > MAX_PROCESSOR_SIDE:
        height, width = MAX_PROCESSOR_SIDE, int(MAX_PROCESSOR_SIDE * aspect)
    return max(height, 1), max(width, 1)


def image_prompt_text(spec: VisionSpec, rows: int, cols: int) -> str:
    """The text Idefics3Processor puts in place of one `<image>`."""
    glob = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{IMAGE_TOKEN * spec.image_seq_len}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return glob
    text = ""
    for r in range(rows):
        text += "".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{IMAGE_TOKEN * spec.image_seq_len}" for c in range(cols))
        text += "\n"
    return text + "\n" + glob


def image_token_ids(tokenizer: Tokenizer, spec: VisionSpec, image: ImageInput) -> list[int]:
    """The prompt tokens of one image, its `<image>` positions holding its placeholder id."""
    ids = tokenizer.encode(image_prompt_text(spec, *tile_grid(spec, image.width, image.height)))
    pad = placeholder_id(spec, image)
    return [pad if t == spec.image_token_id else t for t in ids]


def num_tiles(spec: VisionSpec, image: ImageInput) -> int:
    rows, cols = tile_grid(spec, image.width, image.height)
    return rows * cols + 1


def message_images(messages: Any, limits: ImageLimits) -> tuple[list[Any], list[ImageInput]]:
    """Messages with each image content part (OpenAI's `image_url` with a data URL, or `{"type":
    "image", "data": bytes}`) replaced by an `{"type": "image", "index": k}` part, and the checked
    images in order (none: the messages unchanged)."""
    if not isinstance(messages, list):
        return messages, []
    images: list[ImageInput] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(_is_image(p) for p in content):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if not _is_image(part):
                parts.append(part)
                continue
            where = f"messages[{i}].content[{j}]"
            check_image_count(len(images) + 1, limits)
            if isinstance(part.get("data"), bytes):  # the gRPC API's image part: the bytes themselves
                data = part["data"]
            else:
                url = part.get("image_url")
                data = decode_data_url(url.get("url") if isinstance(url, dict) else url, where, limits)
            images.append(inspect_image(data, where, limits))
            parts.append({"type": "image", "index": len(images) - 1})
        out.append({**message, "content": parts})
    return out, images


def has_image_parts(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(_is_image(p) for p in m["content"])
        for m in messages)


def without_image_parts(messages: list) -> list:
    """The messages with their image content parts left out (to check the rest)."""
    return [{**m, "content": [p for p in m["content"] if not _is_image(p)]}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages]


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image_url", "image")


def encode_chat_with_images(tokenizer: Tokenizer, spec: VisionSpec, messages: list, images: list[ImageInput],
                            add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat whose content parts include images (from `message_images`): each image
    part is rendered as a sentinel, the rendered chat is split there and the image's tokens go in
    between. Document parts cannot be mixed with images (yet)."""
    nonce = secrets.token_hex(8)
    sentinel = f"KVWEAVEIMG{nonce}N{{}}E"
    marked = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = [{"type": "text", "text": sentinel.format(p["index"])} if p.get("type") == "image" else p
                       for p in content if isinstance(p, dict)]
            if any(p.get("type") == "document" for p in content):
                raise InvalidRequestError("document parts cannot be combined with images in one request (yet)")
            message = {**message, "content": content}
        marked.append(message)
    flat, docs = flatten_messages(marked)
    if docs:
        raise InvalidRequestError("documents cannot be combined with images in one request (yet)")
    try:
        pieces = tokenizer.render_chat_pieces(flat, add_generation_prompt)
    except (InvalidMessagesError, TokenizerError) as e:
        raise InvalidRequestError(str(e), getattr(e, "param", None)) from e
    runs = split_at_sentinels(pieces, sentinel, len(images), "image")
    token_ids: list[int] = []
    for k, run in enumerate(runs):
        token_ids += tokenizer.encode_chat_pieces(run)
        if k < len(images):
            token_ids += image_token_ids(tokenizer, spec, images[k])
    return token_ids
