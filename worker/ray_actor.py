"""A worker as a Ray actor: `kvweave serve --launcher ray` hands this class to the control plane's
Ray launcher (controlplane/ray_launcher.py), which creates one actor per worker.

The actor runs `worker.server.run_worker` in its own process and registers in the cluster's Redis
like any worker. It gets its settings as plain dicts (EngineConfig and WorkerOptions fields), so
the launcher needs nothing from the worker package.

Restarts: the launcher creates the actor with its settings and `max_restarts`; when its process
dies, Ray re-creates the actor from the same constructor arguments, and the launcher's watcher
calls `start()` again (a no-op on an actor already serving), so the worker comes back with its id.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

from kvweave.registry import NODE_IP
from worker.engine import EngineConfig
from worker.server import WorkerOptions, run_worker


class WorkerActor:
    """An async Ray actor serving one worker; `start` returns once it is registered."""

    def __init__(self, engine_args: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
                 secrets: dict[str, str] | None = None) -> None:
        """The settings `start()` uses when called without any (as after a restart by Ray)."""
        self._settings = (engine_args, options, secrets)
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._serving: tuple[str, str] | None = None
        self._stopped = False
        self._starting = asyncio.Lock()
        """One start at a time: the launcher's watcher may call `start` while the first one still loads."""

    async def start(self, engine_args: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
                    secrets: dict[str, str] | None = None) -> tuple[str, str]:
        """Load the model and serve (unless already serving); returns (worker id, address). Raises the
        worker's start error. Without arguments it uses the constructor's settings.
        `secrets`: environment variable (KVWEAVE_CLUSTER_SECRET_FILE, ...) -> the file's content,
        written to a private (0700) folder of this actor's process. Refused after `stop`."""
        async with self._starting:
            return await self._start(engine_args, options, secrets)

    async def _start(self, engine_args: dict[str, Any] | None, options: dict[str, Any] | None,
                     secrets: dict[str, str] | None) -> tuple[str, str]:
        if self._stopped:  # the launcher's watcher may still call start on an actor being removed
            raise RuntimeError("this worker actor was stopped")
        if self._serving is not None and not self._task.done():
            return self._serving
        engine_args = engine_args if engine_args is not None else self._settings[0]
        options = options if options is not None else self._settings[1]
        secrets = secrets if secrets is not None else self._settings[2]
        if secrets:
            folder = tempfile.mkdtemp(prefix="kvweave-secret-")
            for name, content in secrets.items():
                path = os.path.join(folder, name.lower())
                with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                    f.write(content)
                os.environ[name] = path
        if options.get("advertise_host") == NODE_IP:
            import ray

            options = options | {"advertise_host": ray.util.get_node_ip_address()}
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(run_worker(
            EngineConfig(**engine_args), WorkerOptions(**options), self._stop,
            lambda server: ready.set_result((server.worker_id, server.address))))
        await asyncio.wait([ready, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            self._task.result()  # raises why the worker could not start
            raise RuntimeError("the worker exited before it was ready")
        self._serving = ready.result()
        return self._serving

    async def stop(self) -> None:
        """Deregister, drain and shut the engine down (the worker's own clean stop); for good."""
        self._stopped = True
        if self._stop is not None:
            self._stop.set()
            await self._task

    def settings(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The engine settings and worker options it was created with (no secrets): a planner that
        adopted this actor starts new ones like it."""
        return self._settings[0], self._settings[1]

    def pid(self) -> int:
        return os.getpid()
