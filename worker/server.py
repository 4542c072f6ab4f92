"""`kvweave worker`: serve one engine over gRPC and keep the cluster informed through Redis.

The process serves `kvweave.v1.Worker` (worker/service.py), the standard `grpc.health.v1` health
service (SERVING once the engine is loaded, NOT_SERVING while shutting down) and server
reflection. With a Redis URL it also:
- heartbeats its registry entry (`kvweave.registry`) with its current load every
  `heartbeat_s`, under a lease of `lease_s`, and refreshes its KV-index entries' TTL with it;
- publishes what every KV tier (device, DRAM, SSD) holds to the KV index (`kvstore.index`): the
  engine's KV events are drained every ~100 ms and written as one pipeline per batch; after a
  lapsed lease (the entry was gone at a heartbeat), a Redis failure, or at first registration, a
  full snapshot replaces the worker's index entries instead;
- fetches the prefix blocks a request lacks from the peers that hold them (worker/kv_prefetch.py),
  and pulls the KV of a request prefilled on another worker (a prefill/decode handoff) from it;
  and serves its own blocks to peers: `kvweave.v1.KVTransfer` on the gRPC port (control, and a
  streaming fallback), the bulk bytes over a raw TCP data plane on a second port that the
  `DataPort` call names (kvstore/transfer.py, kvstore/tcp_transfer.py), or over a torch.distributed
  pair per client process built through `DistConnect` (kvstore/dist_transfer.py). Which one it
  fetches with itself is `kv_transport`.
An encode worker (role encode) loads the same model, answers `Encode` calls (image embeddings
kept in its host tier and published, for prefill workers to fetch) and serves no generate request.
Unless disabled (`metrics_port` -1), it serves its Prometheus metrics over HTTP (GET /metrics, GET
/health; worker/metrics.py, docs/metrics.md) on a third port, named in its registry entry
(`WorkerInfo.metrics_port`) so that the router can list it for Prometheus.
Stopping (SIGTERM / SIGINT): NOT_SERVING, stop accepting calls, deregister, clear the index,
let calls in flight finish within a grace period, shut the engine down.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import grpc
import redis.asyncio as aioredis
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.exceptions import RedisError

from kvweave import cluster_secret
from kvweave.config_flags import add_config_args, config_kwargs
from kvweave.defaults import REGISTRY_LEASE_S
from kvweave.grpc_decode import DecodeErrorInterceptor
from kvweave.registry import ROLES, Registry, WorkerInfo, worker_key
from kvweave.serving import serve_until
from kvstore.index import KVIndex
from kvstore.transfer import GRPC_OPTIONS as TRANSFER_GRPC_OPTIONS
from kvstore.transfer import SERVICE_NAME as TRANSFER_SERVICE_NAME
from kvstore.tcp_transfer import KVDataServer
from kvstore.dist_group import available_backends
from kvstore.dist_transfer import DistServer
from kvstore.ipc_transfer import IpcServer
from kvstore.transfer import KVTransferService
from kvstore.transfer_client import TRANSPORTS, TransferClient
from kvweave.v1 import worker_pb2_grpc
from worker.async_engine import AsyncEngine
from worker.config import StoreConfigError
from worker.embedding_stage import encoder_problem
from worker.engine import EngineConfig, LLMEngine
from worker.kv_prefetch import KVPrefetcher
from worker.metrics import WorkerMetrics, start_metrics_server
from worker.service import SERVICE_NAME, WorkerService

logger = logging.getLogger(__name__)

KV_FLUSH_S = 0.1
"""How often KV events are drained and written to the index."""


class WorkerStartError(RuntimeError):
    """The worker cannot start (Redis unreachable, model not loadable, port taken); says why."""


class WorkerFailedError(RuntimeError):
    """The worker stopped because it could not go on (a tensor-parallel rank died); says why."""


@dataclass
class WorkerOptions:
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """0 picks a free port."""
    redis_url: str | None = None
    """Registry and KV index; None serves without registering."""
    role: str = "colocated"
    """colocated | prefill | decode | encode."""
    worker_id: str | None = None
    """Default: <hostname>-<port>."""
    lease_s: float = REGISTRY_LEASE_S
    """A worker that stops heartbeating leaves the registry (and the index) after this long."""
    heartbeat_s: float = 1.0
    """How often the worker renews its registration and its KV-index entries."""
    advertise_host: str | None = None
    """Host others dial; default: `host`, or this machine's address when `host` is a wildcard."""
    grace_s: float = 5.0
    """How long calls in flight may take to finish at shutdown."""
    peer_fetch: bool = True
    """Fetch what a request lacks from peers the KV index lists (needs Redis); off, only from where the router says."""
    kv_transfer_timeout_s: float = 5.0
    """Deadline of one fetch from a peer; past it the blocks are computed instead."""
    kv_transport: str = "auto"
    """How this worker fetches peers' KV and prefill handoffs: auto (the TCP data plane, the gRPC
    stream for peers without one) | tcp | grpc | dist (a torch.distributed pair per peer: gloo, or
    NCCL between GPU workers) |
    ipc (memory both processes map: peers on this node only; CUDA IPC between GPU workers).
    Every worker serves all of them."""
    metrics_port: int = 0
    """HTTP port of GET /metrics on `host`; 0 picks a free port, -1 serves no metrics."""
    max_waiting: int = 256
    """Requests waiting for their first token beyond which new ones are refused with
    RESOURCE_EXHAUSTED (the router tries another worker); 0: no limit."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; valid: {', '.join(ROLES)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], or -1 for none; got {self.metrics_port}")
        if self.lease_s <= 0 or self.heartbeat_s <= 0:
            raise ValueError("lease_s and heartbeat_s must be positive")
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be shorter than lease_s ({self.lease_s})")
        if self.grace_s < 0 or self.max_waiting < 0:
            raise ValueError("grace_s and max_waiting must be >= 0")
        if self.kv_transfer_timeout_s <= 0:
            raise ValueError("kv_transfer_timeout_s must be positive")
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"unknown kv_transport {self.kv_transport!r}; valid: {', '.join(TRANSPORTS)}")


def _advertise_host(host: str) -> str:
    if host not in ("", "0.0.0.0", "::", "[::]"):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class WorkerServer:
    """One worker: engine, gRPC server, and (with a Redis URL) registration and KV publishing."""

    def __init__(self, engine_config: EngineConfig, options: WorkerOptions, engine: LLMEngine | None = None) -> None:
        """`engine`: an already loaded engine to serve (else one is built from `engine_config`)."""
        self.engine_config = engine_config
        self.options = options
        self.worker_id = options.worker_id or ""
        self.address = ""
        self.engine: AsyncEngine | None = None
        self._llm = engine
        self._server: grpc.aio.Server | None = None
        self.service: WorkerService | None = None
        """The Worker gRPC service, once started."""
        self._health = health.aio.HealthServicer()
        self._redis = None
        self._registry: Registry | None = None
        self._index: KVIndex | None = None
        self._stopping = asyncio.Event()
        self.failed = asyncio.Event()
        """Set when the worker cannot go on (`failure` says why)."""
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._need_snapshot = True
        self._publish_lock = asyncio.Lock()
        self._peers: dict[str, str] = {}
        self._transfer_client: TransferClient | None = None
        self._data_server: KVDataServer | None = None
        self._dist_server: DistServer | None = None
        self._ipc_server: IpcServer | None = None
        self.prefetcher: KVPrefetcher | None = None
        self.metrics = WorkerMetrics()
        self.metrics_port = 0
        """The bound port of GET /metrics once started (0: none)."""
        self._metrics_http: web.AppRunner | None = None

    @property
    def metrics_url(self) -> str | None:
        """http://host:port/metrics on the advertised host, once started (None: no metrics served)."""
        if not self.metrics_port:
            return None
        return f"http://{self.address.rsplit(':', 1)[0]}:{self.metrics_port}/metrics"

    async def start(self) -> str:
        """Load, serve, register; returns the advertised host:port. Raises WorkerStartError."""
        try:
            if self.options.redis_url:
                await self._connect_redis()
            llm = self._llm or await self._load_engine()
            if llm.tp is not None and llm.device.type == "cuda" and (self.options.peer_fetch
                                                                     or self.options.role != "colocated"):
                llm.close()
                raise WorkerStartError("peer KV fetches and prefill/decode roles with tensor parallelism on GPUs "
                                       "are not built (each rank's KV is on its own GPU and the connector moves "
                                       "only the leader's): use --peer-fetch false and --role colocated")
            if self.options.role == "encode" and (problem := encoder_problem(llm)):
                llm.close()
                raise WorkerStartError(problem)
            self.engine = AsyncEngine(llm, enable_kv_events=self._redis is not None)
            loop = asyncio.get_running_loop()
            self.engine.on_fatal = lambda e: loop.call_soon_threadsafe(self._fail, e)
            peers = self._index is not None and self.options.peer_fetch
            # peers' prefix blocks, and prefill handoffs
            kv_device = llm.connector.kv_cache.device
            self._transfer_client = TransferClient(  # GPU workers pair over NCCL (transport dist), map device memory (ipc)
                transport=self.options.kv_transport, secret=cluster_secret.get_secret(), ipc_device=kv_device,
                dist_backend="nccl" if kv_device.type == "cuda" and "nccl" in available_backends() else "gloo")
            self.prefetcher = KVPrefetcher(llm, self._index if peers else None, (lambda: self._peers) if peers else None,
                                           self._transfer_client, self.options.kv_transfer_timeout_s, self.metrics)
            self.engine.prefetch = self.prefetcher
            await self._start_grpc()
            self.metrics.watch(self.engine, self.worker_id, self.options.role)
            if self.options.metrics_port >= 0:
                await self._start_metrics()
            if self._redis is not None:
                await self._heartbeat_once()
                await self._publish_once()
                self._tasks = [asyncio.create_task(self._every(self.options.heartbeat_s, self._heartbeat_once)),
                               asyncio.create_task(self._every(KV_FLUSH_S, self._publish_once))]
            for service in ("", SERVICE_NAME):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self._close()
            raise
        logger.info("worker %s serving %s on %s", self.worker_id, llm.model_name, self.address)
        return self.address

    def _fail(self, error: BaseException) -> None:
        """The engine cannot go on (a tensor-parallel rank died): `failed` makes serve_until stop
        the worker (deregistered, so the router sends nothing more here); the process exits 1."""
        logger.error("worker %s cannot go on: %s", self.worker_id, error)
        self.failure = str(error)
        self.failed.set()
        self._failing = asyncio.ensure_future(self.stop())  # deregisters at once, wherever it is served from

    async def stop(self) -> None:
        """NOT_SERVING, stop accepting, deregister, clear the index, grace-stop, shut the engine down."""
        if self._stopping.is_set():
            return
        await self._health.enter_graceful_shutdown()
        self._stopping.set()
        if self._dist_server is not None:
            self._dist_server.close()  # ends the pairs' streams, which would hold the grace period
        server_stopped = asyncio.ensure_future(self._server.stop(self.options.grace_s)) if self._server else None
        data_stopped = (asyncio.ensure_future(self._data_server.stop(self.options.grace_s))
                        if self._data_server else None)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        await self._leave_cluster()
        if server_stopped is not None:
            await server_stopped
            self._server = None
        if data_stopped is not None:
            await data_stopped
            self._data_server = None
        await self._close()
        logger.info("worker %s stopped", self.worker_id)

    async def _connect_redis(self) -> None:
        url = self.options.redis_url
        try:
            # short timeouts: a peer fetch's index lookup is on a request's path (a hung Redis must not hold it)
            self._redis = aioredis.Redis.from_url(cluster_secret.redis_url(url), socket_connect_timeout=2.0,
                                                  socket_timeout=2.0)
            await self._redis.ping()
        except (RedisError, OSError, ValueError) as e:
            raise WorkerStartError(f"cannot reach Redis at {cluster_secret.redact(url)}: {e}") from e
        self._registry = Registry(self._redis, self.options.lease_s)
        self._index = KVIndex(self._redis, self.options.lease_s)

    async def _load_engine(self) -> LLMEngine:
        try:
            return await asyncio.to_thread(LLMEngine, self.engine_config)
        except StoreConfigError as e:
            raise WorkerStartError(f"cannot open the KV store: {e}") from e
        except (ValueError, OSError) as e:  # ConfigError, ModelNotFoundError, CheckpointError
            raise WorkerStartError(f"cannot load model {self.engine_config.model!r}: {e}") from e

    async def _start_grpc(self) -> None:
        o = self.options
        token_checks = cluster_secret.server_interceptors()
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *TRANSFER_GRPC_OPTIONS],  # a taken port must fail
                                       interceptors=[*token_checks, DecodeErrorInterceptor()])
        try:
            port = self._server.add_insecure_port(f"{o.host}:{o.port}")
        except RuntimeError as e:
            raise WorkerStartError(f"cannot listen on {o.host}:{o.port}: {e}") from e
        if not port:
            raise WorkerStartError(f"cannot listen on {o.host}:{o.port}")
        self.address = f"{o.advertise_host or _advertise_host(o.host)}:{port}"
        self.worker_id = self.worker_id or f"{socket.gethostname()}-{port}"
        self.service = WorkerService(self.engine, self.worker_id, self.metrics, self.address, o.max_waiting, o.role,
                                     self._publish_once if self._index is not None else None)
        worker_pb2_grpc.add_WorkerServicer_to_server(self.service, self._server)
        served = partial(self.metrics.kv_transferred, "out")
        self._data_server = KVDataServer(self.engine, o.host, on_served=served, key=cluster_secret.derive("kv-data-plane"))  # the bulk KV data plane (raw TCP)
        try:
            await self._data_server.start()
        except OSError as e:
            raise WorkerStartError(f"cannot listen for KV data on {o.host}: {e}") from e
        data_server = self._data_server
        self.metrics.watch_refusals(lambda: {"grpc": sum(t.num_refused for t in token_checks),
                                             "kv_data": data_server.num_refused})
        # torch.distributed pairs: the store and each pair's connections on the advertised host
        self._dist_server = DistServer(self.engine, self.address.rsplit(":", 1)[0], on_served=served,
                                       device=self.engine.engine.connector.kv_cache.device)
        # processes of this node map the exported KV (device memory for a GPU peer)
        self._ipc_server = IpcServer(self.engine, self.engine.engine.connector.kv_cache.device, on_served=served)
        KVTransferService(self.engine, self._data_server, dist_server=self._dist_server, ipc_server=self._ipc_server,
                          on_served=served, on_release=self.engine.release_handoff).add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = (SERVICE_NAME, TRANSFER_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._server)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()

    async def _start_metrics(self) -> None:
        o = self.options
        try:
            self._metrics_http, self.metrics_port = await start_metrics_server(
                self.metrics, o.host, o.metrics_port, lambda: self.engine is not None and not self._stopping.is_set())
        except OSError as e:
            raise WorkerStartError(f"cannot serve metrics on {o.host}:{o.metrics_port}: {e}") from e

    def _info(self) -> WorkerInfo:
        llm, cfg = self.engine.engine, self.engine.engine.config
        return WorkerInfo(worker_id=self.worker_id, address=self.address, model=llm.model_name,
                          role=self.options.role, max_num_seqs=cfg.max_num_seqs,
                          max_model_len=llm.max_model_len, max_num_batched_tokens=cfg.max_num_batched_tokens,
                          block_size=cfg.block_size, metrics_port=self.metrics_port,
                          kv_costs_ms=dict(llm.connector.costs_ms),
                          load=self.service.load() if self.service is not None else self.engine.get_load())

    async def _heartbeat_once(self) -> None:
        """Renew the lease; a missing entry (first registration, lapsed lease) asks for a snapshot."""
        try:
            existed = await self._redis.exists(worker_key(self.worker_id))
            await self._registry.heartbeat(self._info())
            await self._index.refresh(self.worker_id)
        except (RedisError, OSError) as e:
            logger.warning("worker %s: heartbeat failed: %s", self.worker_id, e)
            return
        if not existed:
            logger.info("worker %s registered at %s", self.worker_id, self.address)
            self._need_snapshot = True
        if self.prefetcher is not None and self.prefetcher.peers is not None:
            try:
                model = self.engine.engine.model_name
                self._peers = {w.worker_id: w.address for w in await self._registry.list_workers()
                               if w.model == model and w.worker_id != self.worker_id and w.address != self.address}
            except (RedisError, OSError) as e:
                logger.warning("worker %s: listing peers failed: %s", self.worker_id, e)

    async def _publish_once(self) -> None:
        """Write the pending KV events (one pipeline), or a full snapshot when one is due."""
        async with self._publish_lock:  # the periodic flush and an Encode call's: one at a time, in order
            await self._publish()

    async def _publish(self) -> None:
        try:
            entry_bytes = self.engine.engine.connector.layout.nbytes
            if self._need_snapshot:
                self._need_snapshot = False
                for medium, hashes in (await self.engine.get_cached_hashes()).items():
                    await self._index.replace(self.worker_id, medium, hashes, entry_bytes)
                return
            events = self.engine.take_kv_events()
            if events is None:
                self._need_snapshot = True
            elif events:
                await self._index.apply_events(self.worker_id, events, entry_bytes)
        except (RedisError, OSError) as e:
            logger.warning("worker %s: KV index update failed (%s); will publish a snapshot", self.worker_id, e)
            self._need_snapshot = True

    async def _every(self, seconds: float, step: Callable[[], Awaitable[None]]) -> None:
        while not self._stopping.is_set():
            await _sleep_or_stop(self._stopping, seconds)
            if self._stopping.is_set():
                return
            try:
                await step()
            except Exception:  # a bug must not silently end the heartbeat (the worker would vanish)
                logger.exception("worker %s: %s failed", self.worker_id, step.__name__)
                self._need_snapshot = True

    async def _leave_cluster(self) -> None:
        if self._redis is None:
            return
        try:
            await self._registry.deregister(self.worker_id)
            await self._index.clear(self.worker_id)
        except (RedisError, OSError) as e:
            logger.warning("worker %s: could not deregister (%s); the lease will expire", self.worker_id, e)

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        if self._data_server is not None:
            await self._data_server.stop()
            self._data_server = None
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self._dist_server is not None:
            self._dist_server.close()
            self._dist_server = None
        if self._ipc_server is not None:
            self._ipc_server.close()
            self._ipc_server = None
        if self._transfer_client is not None:
            await self._transfer_client.close()
            self._transfer_client = None
        if self._metrics_http is not None:
            await self._metrics_http.cleanup()
            self._metrics_http = None
            self.metrics_port = 0
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
            self.engine = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


async def run_worker(engine_config: EngineConfig, options: WorkerOptions, stop: asyncio.Event | None = None,
                     on_ready: Callable[[WorkerServer], None] | None = None) -> None:
    """Serve until `stop` is set (or this task is cancelled), then stop cleanly.

    `on_ready(server)` is called once serving and registered (`server.address`, `server.worker_id`).
    Raises WorkerStartError when the worker cannot start, WorkerFailedError after it stopped
    because it could not go on.
    """
    server = WorkerServer(engine_config, options)
    await serve_until(server, stop, on_ready)
    if server.failure is not None:
        raise WorkerFailedError(server.failure)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from worker.engine_args import add_engine_args

    p = sub.add_parser("worker", help="serve one engine over gRPC and register it in Redis",
                       description="Serve kvweave.v1.Worker, grpc.health.v1 and reflection; with --redis-url, "
                                   "register under a lease and publish the prefix cache to the KV index.")
    add_config_args(p, WorkerOptions, choices={"role": ROLES, "kv_transport": TRANSPORTS})
    add_config_args(p, cluster_secret.SecurityOptions)
    add_engine_args(p)
    # as a program, the process ends without the interpreter's teardown (cli.main): once `run` returns
    # everything it opened is closed, and collecting torch's modules took ~1.5 s of every stop
    p.set_defaults(func=run, skip_teardown=True)


def run(args: argparse.Namespace) -> int:
    from worker.engine_args import engine_config_from_args

    try:
        engine_config = engine_config_from_args(args)
        options = WorkerOptions(**config_kwargs(WorkerOptions, args))
        cluster_secret.install(cluster_secret.SecurityOptions(**config_kwargs(cluster_secret.SecurityOptions, args)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(engine_config, options))
    except (WorkerStartError, WorkerFailedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


async def _serve(engine_config: EngineConfig, options: WorkerOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def ready(server: WorkerServer) -> None:
        metrics = f" metrics {server.metrics_url}" if server.metrics_url else ""
        print(f"kvweave worker {server.worker_id} ready on {server.address}{metrics}", flush=True)

    await run_worker(engine_config, options, stop, ready)
