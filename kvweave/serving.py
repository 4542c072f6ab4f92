"""How every kvweave server process runs: start, report ready, serve until told to stop, stop.

The router (controlplane/router_main.py) and the worker (worker/server.py) both serve this way,
so they stop alike on SIGTERM, Ctrl-C or a cancelled task. A process whose state is all closed
when it stops ends with `exit_now`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown, for a process that has closed all it
    opened: collecting torch's modules took ~1.5 s of every worker's and TP rank's stop."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def serve_until(server: Any, stop: asyncio.Event | None = None,
                      on_ready: Callable[[Any], None] | None = None) -> None:
    """Start `server` (anything with async start/stop), call `on_ready(server)`, serve until the
    `stop` event is set, the server's own `failed` event (where it has one: it cannot go on) is
    set, or the task is cancelled; then stop it cleanly."""
    await server.start()
    try:
        if on_ready is not None:
            on_ready(server)
        waits = [asyncio.ensure_future((stop or asyncio.Event()).wait())]
        failed = getattr(server, "failed", None)
        if failed is not None:
            waits.append(asyncio.ensure_future(failed.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
    finally:
        await server.stop()
