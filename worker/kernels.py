"""Optional compiled CPU kernels, built on first use with torch's C++ extension loader.

The build is cached (under `KVWEAVE_KERNEL_DIR`, default `~/.cache/kvweave/kernels`, one folder per
source text, checkout, torch version, CPU and build flags) and takes about a minute once; later
processes import the built library directly (`_import_built`). Where it
cannot be built (no compiler, `KVWEAVE_KERNELS=0`), callers fall back to the pure-torch path, which
computes the same thing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("bindings.cpp", "paged_attention.cpp", "fused_ops.cpp", "decode_forward.cpp",
                                               "bf16_gemm.cpp", "f32_gemm.cpp", "prefill_attention.cpp")]
_CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
"""-fopenmp: at::parallel_for runs serially in code built without it. The extension links
libgomp.so.1, the soname torch already loaded, so the kernels share torch's OpenMP threads."""
_LDFLAGS = ("-fopenmp",)
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
        build_dir = kernel_build_dir()
        _module = _import_built(build_dir)
        if _module is None:
            from torch.utils.cpp_extension import load

            build_dir.mkdir(parents=True, exist_ok=True)
            with _build_lock(build_dir):
                _module = load(name=_NAME, sources=[str(p) for p in _SOURCES], build_directory=str(build_dir),
                               extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS), verbose=False)
            (build_dir / _READY).touch()
    except Exception as e:  # no compiler, no ninja, a build error: the torch path still works
        logger.warning("CPU kernels unavailable, using the torch path: %s", e)
        _module = None
    return _module


_NAME = "kvweave_cpu_kernels"
_READY = "ready"
"""Written in a build folder once a load of its library succeeded."""


def _import_built(build_dir: Path) -> ModuleType | None:
    """The library of a build folder a load has already succeeded from, imported as it is (~1 ms,
    where torch's `load` runs ninja to check it, ~0.2 s of every worker's start); None otherwise.
    The folder is named by the sources' text and the build's settings, so what it holds is current."""
    import importlib.util

    import torch  # noqa: F401  (the library links libtorch: loaded first)

    library = build_dir / f"{_NAME}.so"
    if not (build_dir / _READY).is_file() or not library.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(_NAME, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as e:
        logger.warning("rebuilding the CPU kernels: %s does not load (%s)", library, e)
        return None
    return module


class _Profiled:
    """The kernel module seen by a torch profiler: each call runs inside a `kvweave::NAME` range
    (calls through pybind are invisible to the profiler otherwise)."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str):
        import torch

        fn = getattr(self._module, name)

        def call(*args, **kwargs):
            label = f"kvweave::{name}"
            if name in ("bf16_linear", "f32_linear"):  # (out, in) features, as a linear op's shapes tell them
                label += f"({args[3]}, {args[0].shape[-1]})"
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return call


@contextlib.contextmanager
def profiled_kernels():
    """Within: every kernel call is a named range of a running torch profiler (benchmarks' op
    breakdowns); no cost outside."""
    global _module
    plain = cpu_kernels()
    _module = _Profiled(plain) if plain is not None else None
    try:
        yield
    finally:
        _module = plain


def kernel_build_dir() -> Path:
    """The build folder of this checkout's kernels for this torch and CPU: one per source text,
    source folder (the build command names the files: two checkouts sharing a folder would rebuild
    each other's), torch version, CPU (-march=native) and build flags."""
    import torch

    key = [p.read_bytes() for p in [*_SOURCES, *sorted(_CSRC.glob("*.h"))]]
    key += [str(_CSRC).encode(), torch.__version__.encode(), _cpu_flags().encode(),
            " ".join(_CFLAGS + _LDFLAGS).encode()]
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()
    base = Path(os.environ.get("KVWEAVE_KERNEL_DIR", Path.home() / ".cache" / "kvweave" / "kernels"))
    return base / digest[:16]


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Serialize builds of one folder with a lock the kernel drops when its holder dies. torch's own
    lock is a file that a build killed midway leaves behind, after which every later load waits for
    it forever (a worker hanging on its first request); holding ours, no build is running, so such a
    file is stale and is removed."""
    with open(build_dir / "kvweave.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("removing the stale build lock %s (a build was killed midway)", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cpu_flags() -> str:
    """The first CPU's model name and flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read().split("\n\n")[0].splitlines() if line.startswith(("model name", "flags"))]
    except OSError:
        return ""
    return "\n".join(lines)
