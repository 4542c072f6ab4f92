"""Optional compiled CPU kernels, built on first use with torch's C++ extension loader.

The build is cached (under `KVWEAVE_KERNEL_DIR`, default `~/.cache/kvweave/kernels`, one folder per
source text, checkout, torch version and CPU) and takes about a minute once. Where it cannot be built (no compiler, `KVWEAVE_KERNELS=0`), callers fall
back to the pure-torch path, which computes the same thing.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("bindings.cpp", "paged_attention.cpp", "fused_ops.cpp")]
_module: ModuleType | None = None
_tried = False


def cpu_kernels() -> ModuleType | None:
    """The compiled kernel module, or None when unavailable (disabled, or the build failed)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("KVWEAVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        import torch

        # One build per source text, source folder (the build command names the files: two checkouts
        # sharing a folder would rebuild each other's), torch version and CPU (-march=native).
        key = [p.read_bytes() for p in [*_SOURCES, _CSRC / "common.h"]]
        key += [str(_CSRC).encode(), torch.__version__.encode(), _cpu_flags().encode()]
        digest = hashlib.sha256(b"\0".join(key)).hexdigest()
        base = Path(os.environ.get("KVWEAVE_KERNEL_DIR", Path.home() / ".cache" / "kvweave" / "kernels"))
        build_dir = base / digest[:16]
        build_dir.mkdir(parents=True, exist_ok=True)
        _module = load(name="kvweave_cpu_kernels", sources=[str(p) for p in _SOURCES], build_directory=str(build_dir),
                       extra_cflags=["-O3", "-march=native", "-ffast-math"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a build error: the torch path still works
        logger.warning("CPU kernels unavailable, using the torch path: %s", e)
        _module = None
    return _module


def _cpu_flags() -> str:
    """The first CPU's model name and flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read().split("\n\n")[0].splitlines() if line.startswith(("model name", "flags"))]
    except OSError:
        return ""
    return "\n".join(lines)
