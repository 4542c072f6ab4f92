"""`kvweave router`: the router with its gRPC and OpenAI HTTP frontends, in one process.

In-process use (launchers, tests):
    server = RouterServer(RouterConfig(redis_url=url, model=m), ServeOptions(grpc_port=0, http_port=0))
    await server.start()            # server.grpc_port / server.http_port are the bound ports
    ...
    await server.stop()
or `await run_router(config, options, stop_event, on_ready)` to serve until the event is set.

Security options (README "Authentication and tenants"): `api_keys_file` turns on API keys, tenants
and rate limits (controlplane/auth.py; the file is re-read when it changes, polled every
`api_keys_reload_s`, and on SIGHUP); `tls_cert_file` + `tls_key_file` serve both frontends over TLS,
`tls_client_ca_file` also requires client certificates (controlplane/tls.py).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import redis
from aiohttp import web

from controlplane.auth import ApiKeys, Gate
from controlplane.grpc_frontend import RouterHealth, start_grpc_server
from controlplane.http_frontend import DEFAULT_MAX_BODY_BYTES, start_http_server
from controlplane.policies import POLICIES, PolicyError
from controlplane.router import Router, RouterConfig
from kvweave import cluster_secret
from controlplane.tls import TLSFiles, grpc_credentials, http_ssl_context
from kvweave.config_flags import add_config_args, config_kwargs
from kvweave.serving import serve_until

logger = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    """Interface to bind."""
    grpc_port: int = 0
    """Port of the gRPC API (kvweave.v1.Inference); 0 picks a free port."""
    http_port: int = 0
    """Port of the OpenAI-compatible HTTP API; 0 picks a free port."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request: HTTP bodies beyond it get 413, gRPC messages RESOURCE_EXHAUSTED."""
    grace_s: float = 5.0
    """How long gRPC calls in flight may take to finish at shutdown."""
    api_keys_file: str | None = None
    """JSON file of API keys, each with its tenant, cache namespace and rate limits (README
    "Authentication and tenants"); re-read when it changes and on SIGHUP. None: no authentication."""
    api_keys_reload_s: float = 5.0
    """How often the API keys file is checked for changes, seconds."""
    tls_cert_file: str | None = None
    """PEM certificate chain: serve gRPC and HTTP over TLS (with tls_key_file)."""
    tls_key_file: str | None = None
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: str | None = None
    """PEM CA certificates: clients must present a certificate signed by one (mutual TLS)."""

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if self.api_keys_reload_s <= 0:
            raise ValueError("api_keys_reload_s must be positive")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")

    @property
    def tls(self) -> TLSFiles | None:
        if self.tls_cert_file is None:
            return None
        return TLSFiles(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)


class RouterServer:
    """Router + gRPC frontend + HTTP frontend."""

    def __init__(self, config: RouterConfig, options: ServeOptions | None = None, router: Router | None = None) -> None:
        """`router`: an already built Router to serve (else built from `config`, loading the tokenizer)."""
        self.config = config
        self.options = options or ServeOptions()
        self.router = router
        self.grpc_port = 0
        self.http_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.gate = Gate()
        self._watch: asyncio.Task | None = None
        self._health: asyncio.Task | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.options.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.options.tls else "http"
        return f"{scheme}://{self.options.host}:{self.http_port}"

    def reload_api_keys(self) -> bool:
        """Re-read the API keys file now (SIGHUP); a bad file keeps the current keys."""
        return self.gate.force_reload()

    async def start(self) -> None:
        """Load the tokenizer, watch the registry, serve both frontends. Raises OSError (port taken),
        PolicyError, ModelNotFoundError / CheckpointError, or redis errors (Redis unreachable)."""
        o = self.options
        try:
            self.gate = self._gate()
            ssl_context = http_ssl_context(o.tls) if o.tls else None
            credentials = grpc_credentials(o.tls) if o.tls else None
            if self.router is None:
                self.router = await asyncio.to_thread(Router, self.config)
            encoded_image = -(-self.router.config.max_image_bytes // 3) * 4
            if o.max_body_bytes < encoded_image:
                logger.warning("max_body_bytes %d is below one image at max_image_bytes %d in a data URL (%d bytes): "
                               "such images are refused before their own limit applies", o.max_body_bytes,
                               self.router.config.max_image_bytes, encoded_image)
            self.gate.on_refuse = self.router.metrics.count_refused
            await self.router.start()
            health_status = RouterHealth(self.router)
            self._grpc, self.grpc_port = await start_grpc_server(self.router, o.host, o.grpc_port, self.gate,
                                                                 credentials, health_status, o.max_body_bytes)
            self._health = asyncio.create_task(health_status.run(), name="router-health")
            self._http, self.http_port = await start_http_server(self.router, o.host, o.http_port, o.max_body_bytes,
                                                                 self.gate, ssl_context)
            if self.gate.enabled:
                self._watch = asyncio.create_task(self._watch_keys(), name="api-keys-watch")
        except BaseException:
            await self.stop()
            raise
        logger.info("router serving %s: grpc %s, http %s", self.router.model.name, self.grpc_address, self.http_url)

    def _gate(self) -> Gate:
        """API keys from the options' file (ApiKeysFileError, a ValueError, when unusable), or none."""
        if self.options.api_keys_file is None:
            logger.warning("no API keys file: the router serves anyone who reaches it, and clients choose their "
                           "tenant (cache namespace); give --api-keys-file to require keys")
            return Gate()
        keys = ApiKeys(self.options.api_keys_file)
        logger.info("API keys: %d key(s) from %s", len(keys), self.options.api_keys_file)
        return Gate(keys)

    async def _watch_keys(self) -> None:
        """Reload the keys file when it changes (a Kubernetes Secret volume swaps a symlink)."""
        while True:
            await asyncio.sleep(self.options.api_keys_reload_s)
            self.gate.reload_keys()

    async def stop(self) -> None:
        for task in (self._watch, self._health):
            if task is not None:
                task.cancel()
        self._watch = self._health = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(self.options.grace_s)
            self._grpc = None
        if self.router is not None:
            await self.router.stop()


async def run_router(config: RouterConfig, options: ServeOptions, stop: asyncio.Event | None = None,
                     on_ready: Callable[[RouterServer], None] | None = None) -> None:
    """Serve until `stop` is set (or this task is cancelled), then stop cleanly."""
    await serve_until(RouterServer(config, options), stop, on_ready)


ROUTER_HELP = {
    "policy": f"routing policy: {', '.join(POLICIES)}",
    "chunk_separator": "split plain text prompts at this text (removed): the pieces strictly between two "
                       "separators are reusable chunks whose KV may be reused wherever they appear, the first and "
                       "last pieces are not; for clients that cannot send segments (None: prompts are not split)",
}
"""Help texts written for the command line where a field's docstring speaks of the code."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="route requests to workers (gRPC + OpenAI-compatible HTTP)",
                       description="Serve kvweave.v1.Inference and the OpenAI API, placing each request on "
                                   "a worker found in the Redis registry.")
    add_config_args(p, ServeOptions, flags={"grpc_port": "--port"})
    add_config_args(p, RouterConfig, help=ROUTER_HELP)
    add_config_args(p, cluster_secret.SecurityOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = RouterConfig(**config_kwargs(RouterConfig, args))
        options = ServeOptions(**config_kwargs(ServeOptions, args))
        if config.policy not in POLICIES:
            raise PolicyError(f"unknown routing policy {config.policy!r}; valid: {', '.join(POLICIES)}")
        cluster_secret.install(cluster_secret.SecurityOptions(**config_kwargs(cluster_secret.SecurityOptions, args)))
        shown_url, config.redis_url = config.redis_url, cluster_secret.redis_url(config.redis_url)  # password in memory only
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, options))
    except redis.RedisError as e:
        print(f"error: cannot reach Redis at {cluster_secret.redact(shown_url)}: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # port taken, model not found, bad API keys or TLS files
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: RouterConfig, options: ServeOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def ready(server: RouterServer) -> None:
        loop.add_signal_handler(signal.SIGHUP, server.reload_api_keys)
        print(f"kvweave router ready: grpc {server.grpc_address} http {server.http_url}", flush=True)

    await run_router(config, options, stop, ready)
