"""A kvweave model as a Hugging Face checkpoint folder, for servers that read only those (vLLM).

`export_hf_folder(model, folder)` writes what `transformers` and vLLM load:
- `config.json`: a `LlamaConfig` built from our `ModelArgs` (benchmarks.hf_baseline.hf_config),
  with the model's bos/eos ids and its dtype;
- `model.safetensors`: the weights `worker.loader.load_checkpoint` reads (a GGUF is dequantized),
  under Hugging Face Llama names, in `dtype` (bf16 by default, what kvweave serves on the CPU);
- `tokenizer.json` (the `tokenizers` tokenizer kvweave builds, from the GGUF's vocabulary and
  merges for the built-in model), `tokenizer_config.json` (bos/eos, chat template) and
  `generation_config.json`.
Files go to a temporary sibling folder first, renamed into place when complete, so a folder that
exists is whole. An existing folder whose `kvweave_export.json` names the same source (path, size,
modification time) and dtype is reused as is.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvweave.model_files import resolve_model, write_config_json, write_tokenizer_files
from worker.loader import LoadedCheckpoint, load_checkpoint

logger = logging.getLogger(__name__)

STAMP = "kvweave_export.json"
"""The file in an exported folder that says what it was made from."""


def source_stamp(model: str, dtype: torch.dtype) -> dict:
    """What identifies an export: the model's resolved path, its size and mtime, and the dtype."""
    path = resolve_model(model)
    st = path.stat()
    return {"model": model, "source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "dtype": str(dtype).removeprefix("torch.")}


def export_hf_folder(model: str, folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model` (built-in name, HF folder or GGUF) as a Hugging Face folder at `folder` (reused
    when it already holds this export); returns the folder."""
    folder = Path(folder)
    stamp = source_stamp(model, dtype)
    if _read_stamp(folder) == stamp:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_hf_files(load_checkpoint(model, dtype=dtype), tmp, dtype)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s as a Hugging Face folder at %s", model, folder)
    return folder


def write_hf_files(ckpt: LoadedCheckpoint, folder: Path, dtype: torch.dtype) -> None:
    """The config, weights and tokenizer files of `ckpt` in `folder`."""
    from benchmarks.hf_baseline import hf_config

    args = ckpt.args
    eos = args.eos_token_ids[0] if len(args.eos_token_ids) == 1 else (args.eos_token_ids or None)
    config = hf_config(args)
    config.eos_token_id, config.pad_token_id, config.dtype = eos, None, dtype
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    save_file({k: v.to(dtype).contiguous() for k, v in ckpt.weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    write_tokenizer_files(ckpt.tokenizer, args.max_seq_len, folder)
    write_config_json(folder / "generation_config.json", {"bos_token_id": args.bos_token_id, "eos_token_id": eos})


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None
