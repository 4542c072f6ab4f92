"""How every kvweave server process runs: start, report ready, serve until told to stop, stop.

The router (controlplane/router_main.py) and the worker (worker/server.py) both serve this way,
so they stop alike on SIGTERM, Ctrl-C or a cancelled task.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


async def serve_until(server: Any, stop: asyncio.Event | None = None,
                      on_ready: Callable[[Any], None] | None = None) -> None:
    """Start `server` (anything with async start/stop), call `on_ready(server)`, serve until the
    `stop` event is set or the task is cancelled, then stop it cleanly."""
    await server.start()
    try:
        if on_ready is not None:
            on_ready(server)
        await (stop or asyncio.Event()).wait()
    finally:
        await server.stop()
