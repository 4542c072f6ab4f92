"""The cluster secret: one random key that every process of a cluster holds, and what derives from it.

A deployment gives each process (router, workers, `kvweave serve`) the path of a file holding the
secret (`--cluster-secret-file`, or the environment variable KVWEAVE_CLUSTER_SECRET_FILE, which the
flag also sets so that children inherit it; never the secret itself on a command line, where `ps`
shows it). `LocalCluster`, `kvweave serve` and the Ray launcher write a fresh one (mode 0600) per
cluster. Each use gets its own sub-key, HMAC-SHA256(secret, label), so no sub-key reveals another:
- "grpc-token": the credential every router->worker and worker->worker gRPC call carries (metadata
  `x-kvweave-cluster-token`); the workers' gRPC server refuses calls without it (UNAUTHENTICATED);
- "kv-data-plane": the challenge-response handshake of the TCP KV data plane (kvstore/tcp_wire.py);
- "registry": the HMAC that signs each worker's registry entry (kvweave/registry.py);
- "kv-hash": the salt of the block and chunk hash chain (kvstore/keys.py), so hashes cannot be
  computed offline from a guessed text;
- "ssd-mac": the keyed MAC of every SSD entry (kvstore/ssd.py).
Without a secret a process runs open (no credential checked, unsigned entries, unsalted hashes) and
logs a warning once.

The Redis password is separate (an external Redis has its own): `--redis-password-file` or
KVWEAVE_REDIS_PASSWORD_FILE names a file holding it; `redis_url` adds it to a Redis URL in memory.

This is the shared bottom layer (router and workers both use it): it imports grpc, never torch.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import grpc

logger = logging.getLogger(__name__)

SECRET_ENV = "KVWEAVE_CLUSTER_SECRET_FILE"
REDIS_PASSWORD_ENV = "KVWEAVE_REDIS_PASSWORD_FILE"
TOKEN_METADATA_KEY = "x-kvweave-cluster-token"
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
UNAUTHENTICATED_MESSAGE = "this call needs the cluster's credential"
OPEN_METHODS = ("/grpc.health.v1.Health/",)
"""gRPC methods served without the credential (health probes disclose nothing)."""


class SecretError(ValueError):
    """The secret (or password) file cannot be used; says why (never what it holds)."""


@dataclass
class SecurityOptions:
    """The flags every cluster process takes (router, worker, serve)."""

    cluster_secret_file: str | None = None
    """File holding the cluster secret (at least 16 bytes; keep it mode 0600). None: run open (no
    credentials between router, workers and the KV data plane) with a warning."""
    redis_password_file: str | None = None
    """File holding the Redis password (None: the Redis URL's own, or none)."""


@dataclass(frozen=True)
class ClusterSecret:
    key: bytes

    def derive(self, label: str) -> bytes:
        """The 32-byte sub-key for one use."""
        return hmac.new(self.key, b"kvweave/" + label.encode(), hashlib.sha256).digest()

    @property
    def grpc_token(self) -> str:
        return self.derive("grpc-token").hex()

    def __repr__(self) -> str:  # never print the key
        return "ClusterSecret(<hidden>)"


def _read_private_file(path: str, what: str) -> bytes:
    try:
        st = os.stat(path)
        data = Path(path).read_bytes()[:MAX_SECRET_BYTES + 1]
    except OSError as e:
        raise SecretError(f"cannot read the {what} file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the %s file %s is readable by other users (mode %o); make it 0600", what, path,
                       stat.S_IMODE(st.st_mode))
    return data.strip()


def load_secret(path: str) -> ClusterSecret:
    data = _read_private_file(path, "cluster secret")
    if not MIN_SECRET_BYTES <= len(data) <= MAX_SECRET_BYTES:
        raise SecretError(f"the cluster secret in {path} must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
                          f"has {len(data)}")
    return ClusterSecret(data)


_loaded: dict[str, ClusterSecret] = {}
_warned = False


def get_secret() -> ClusterSecret | None:
    """This process's cluster secret (from KVWEAVE_CLUSTER_SECRET_FILE, read once per path), or None
    (open cluster, warned once). Raises SecretError when the file is unusable."""
    global _warned
    path = os.environ.get(SECRET_ENV)
    if not path:
        if not _warned:
            _warned = True
            logger.warning("no cluster secret (--cluster-secret-file / %s): workers, the KV data plane and "
                           "the registry accept any caller", SECRET_ENV)
        return None
    if path not in _loaded:
        _loaded[path] = load_secret(path)
    return _loaded[path]


def derive(label: str) -> bytes | None:
    """This process's sub-key for `label`, None without a secret."""
    secret = get_secret()
    return None if secret is None else secret.derive(label)


def hash_salt() -> bytes:
    """The salt of the block/chunk hash chain (b"" without a secret); see kvstore.keys.encode_extra_keys."""
    key = derive("kv-hash")
    return b"" if key is None else key


def install(options: SecurityOptions) -> None:
    """Make `options` this process's (and its children's): set the environment variables, then read
    the files once so that a bad one fails at start. Raises SecretError."""
    if options.cluster_secret_file:
        os.environ[SECRET_ENV] = os.path.abspath(options.cluster_secret_file)
    if options.redis_password_file:
        os.environ[REDIS_PASSWORD_ENV] = os.path.abspath(options.redis_password_file)
    get_secret()
    redis_password()


def write_secret_file(path: str | Path, nbytes: int = 32) -> Path:
    """A fresh random secret (hex) in a new file of mode 0600; the folder should be private (0700)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(nbytes))
    return path


def new_cluster_files(folder: str | Path) -> dict[str, str]:
    """A fresh secret and Redis password in `folder` (made 0700): the environment a cluster's
    children need (KVWEAVE_CLUSTER_SECRET_FILE, KVWEAVE_REDIS_PASSWORD_FILE -> paths)."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return {SECRET_ENV: str(write_secret_file(folder / "cluster-secret")),
            REDIS_PASSWORD_ENV: str(write_secret_file(folder / "redis-password"))}


# -- Redis -------------------------------------------------------------------------------------------

def read_redis_password(path: str) -> str:
    data = _read_private_file(path, "Redis password")
    if not data or b"\n" in data or len(data) > 512:
        raise SecretError(f"the Redis password file {path} must hold one line of at most 512 bytes")
    return data.decode("utf-8", "replace")


def redis_password() -> str | None:
    """The Redis password of this process (from KVWEAVE_REDIS_PASSWORD_FILE), or None."""
    path = os.environ.get(REDIS_PASSWORD_ENV)
    return read_redis_password(path) if path else None


def with_password(url: str, password: str | None) -> str:
    """`url` with `password` added (unchanged when it has one already, or `password` is None)."""
    parts = urlsplit(url)
    if password is None or parts.password or parts.scheme not in ("redis", "rediss"):
        return url
    netloc = f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def redis_url(url: str) -> str:
    """`url` with this process's Redis password added (in memory only). Show `redact(url)` in
    messages, never this."""
    return with_password(url, redis_password())


def redact(url: str) -> str:
    """A Redis URL fit for a message: its password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"))


# -- gRPC --------------------------------------------------------------------------------------------

class _AddToken:
    """Adds the cluster credential to a call's metadata. grpc.aio files each interceptor under one
    kind of call only (the first base it matches), hence one subclass per kind below."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(tuple(d.metadata) if d.metadata is not None else ()))
        metadata.add(TOKEN_METADATA_KEY, self.token)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


class _UnaryUnaryToken(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamToken(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryToken(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamToken(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def client_interceptors(secret: ClusterSecret | None = None) -> list | None:
    """Interceptors for a grpc.aio channel to a worker (`interceptors=`): the credential of `secret`
    (default: this process's); None without a secret."""
    secret = secret or get_secret()
    if secret is None:
        return None
    kinds = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    return [kind(secret.grpc_token) for kind in kinds]


def insecure_channel(address: str, options=None, secret: ClusterSecret | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to a cluster member whose calls carry the cluster credential."""
    return grpc.aio.insecure_channel(address, options=options, interceptors=client_interceptors(secret))


async def _refuse(request, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call without the cluster credential, except OPEN_METHODS; the
    refused request is never parsed. `num_refused` counts them."""

    def __init__(self, secret: ClusterSecret) -> None:
        self._token = secret.grpc_token.encode()
        self.num_refused = 0

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == TOKEN_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._token)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS) or self._authorized(
                handler_call_details.invocation_metadata):
            return handler
        self.num_refused += 1
        if self.num_refused == 1 or self.num_refused % 1000 == 0:
            logger.warning("refused %d gRPC call(s) without the cluster credential (latest: %s)", self.num_refused,
                           method[:100])
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        return make[(handler.request_streaming, handler.response_streaming)](_refuse)


def server_interceptors(secret: ClusterSecret | None = None) -> list[ClusterTokenInterceptor]:
    """For `grpc.aio.server(interceptors=...)` of a worker: [] without a secret (open)."""
    secret = secret or get_secret()
    return [] if secret is None else [ClusterTokenInterceptor(secret)]
