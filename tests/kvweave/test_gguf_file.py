"""kvweave's GGUF header reader against gguf-py's own `GGUFReader` on the same files: every metadata
value and every tensor (type, shape, bytes) equal; damaged files are clear ValueErrors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from kvweave.gguf_file import GGUFFile


def _same_as_gguf_py(path: Path) -> None:
    ours, theirs = GGUFFile(path), GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == expected
    by_name = {t.name: t for t in theirs.tensors}
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for t in ours.tensors:
        ref = by_name[t.name]
        assert t.tensor_type == ref.tensor_type and t.shape == tuple(int(d) for d in ref.shape)
        assert t.data.dtype == ref.data.dtype and np.array_equal(t.data, np.asarray(ref.data))


def test_the_tiny_checkpoint_reads_as_gguf_py_reads_it(tiny_gguf_model: Path) -> None:
    _same_as_gguf_py(tiny_gguf_model)


@pytest.mark.slow
def test_the_default_model_reads_as_gguf_py_reads_it(default_model_path: Path) -> None:
    """Quantized tensors (bytes per row) and the 49,152-token vocabulary."""
    _same_as_gguf_py(default_model_path)


def test_damaged_files_are_value_errors(tiny_gguf_model: Path, tmp_path: Path) -> None:
    data = tiny_gguf_model.read_bytes()
    cases = {"magic": b"GGUX" + data[4:], "header": data[:200], "data": data[:-64]}
    messages = {"magic": "bad magic", "header": "truncated", "data": "past the end of the file"}
    for name, content in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=messages[name]):
            GGUFFile(path)
    for cut in range(24, min(len(data), 40_000), 397):  # inside every kind of field, the vocabulary's strings too
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|past the end of the file"):
            GGUFFile(path)
