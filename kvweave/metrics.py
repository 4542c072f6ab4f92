"""What the router's, the workers' and the planner's Prometheus metrics share: the latency buckets,
the exposition content type, and the small HTTP server of a /metrics endpoint.

The router (controlplane/metrics.py) and every worker (worker/metrics.py) report TTFT,
inter-token and end-to-end latency histograms with the same buckets, so their quantiles compare
bucket for bucket; they are defined here, below both.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
"""Latency buckets (seconds) of the router's and the workers' TTFT, inter-token and end-to-end histograms."""

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""Content type of a /metrics answer."""


async def serve_http(routes: dict[str, Callable[[Any], Awaitable[Any]]], host: str, port: int) -> tuple[Any, int]:
    """Serve GET `routes` (path -> aiohttp handler) on host:port (0: a free port); returns the
    runner (`await runner.cleanup()` stops it) and the bound port. Raises OSError when the port
    cannot be bound (nothing is left running then)."""
    from aiohttp import web

    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
