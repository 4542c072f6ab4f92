"""Client authentication at the router's frontends: API keys, the tenant each key stands for, and
per-key rate limits.

Keys come from a JSON file (`ServeOptions.api_keys_file`), e.g.

    {"keys": [
      {"key": "sk-alpha-...", "tenant": "alpha", "requests_per_minute": 600, "tokens_per_minute": 200000},
      {"key_sha256": "<64 hex digits: sha256 of the key>", "tenant": "beta", "namespace": "shared"}
    ]}

(a bare list of entries works too). An entry holds the key itself or its SHA-256 (so the file need
not hold secrets), the tenant, the cache namespace (default: the tenant; tenants share KV only when
configured with the same namespace) and optional limits. A presented key is hashed and compared
with every stored digest in constant time (`hmac.compare_digest`, no early exit).

The file may be a mounted Kubernetes Secret: `ApiKeys.reload_if_changed` compares the file's
(device, inode, mtime, size) after following symlinks (a Secret volume swaps its `..data`
symlink), the router polls it and reloads on SIGHUP; a bad new file keeps the old keys and logs
an error.

Rate limits are token buckets per key (state only for configured keys, dropped when a key leaves
the file): a bucket of `requests_per_minute` requests refilled continuously, and one of
`tokens_per_minute` tokens, debited with prompt + completion tokens when a request ends. A request
needs one whole request token and a token bucket that is not negative; otherwise it is refused with
the seconds until it would pass (`RateLimitedError.retry_after_s`).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from controlplane.errors import AuthenticationError, PermissionDeniedError, RateLimitedError
from controlplane.router_types import Delta
from kvweave.limits import check_id

logger = logging.getLogger(__name__)

_ENTRY_FIELDS = {"key", "key_sha256", "tenant", "namespace", "requests_per_minute", "tokens_per_minute", "name"}


class ApiKeysFileError(ValueError):
    """The API keys file is missing, unreadable or malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """What one API key stands for."""

    name: str
    namespace: str
    """Cache namespace of its requests (the workers' cache_namespace)."""
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    key_id: str = ""
    """The key's SHA-256, hex: its identity in the rate limiter (never the key itself)."""


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_api_keys(text: str) -> list[tuple[bytes, Tenant]]:
    """(key digest, tenant) per entry of an API keys file's JSON; raises ApiKeysFileError."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ApiKeysFileError(f"not valid JSON: {e}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise ApiKeysFileError('expected {"keys": [...]} or a list of key entries')
    parsed, seen = [], set()
    for i, entry in enumerate(entries):
        digest, tenant = _parse_entry(entry, f"keys[{i}]")
        if digest in seen:
            raise ApiKeysFileError(f"keys[{i}]: the same key appears twice")
        seen.add(digest)
        parsed.append((digest, tenant))
    return parsed


def _parse_entry(entry, where: str) -> tuple[bytes, Tenant]:
    if not isinstance(entry, dict):
        raise ApiKeysFileError(f"{where} must be an object")
    if unknown := sorted(set(entry) - _ENTRY_FIELDS):
        raise ApiKeysFileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if ("key" in entry) == ("key_sha256" in entry):
        raise ApiKeysFileError(f"{where}: give exactly one of 'key' and 'key_sha256'")
    if "key" in entry:
        if not isinstance(entry["key"], str) or not entry["key"]:
            raise ApiKeysFileError(f"{where}: 'key' must be a non-empty string")
        digest = key_digest(entry["key"])
    else:
        try:
            digest = bytes.fromhex(entry["key_sha256"]) if isinstance(entry["key_sha256"], str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ApiKeysFileError(f"{where}: 'key_sha256' must be 64 hex digits")
    names = {}
    for field in ("tenant", "namespace"):
        value = entry.get(field, entry.get("tenant"))
        try:
            names[field] = check_id(field, value, required=True)
        except ValueError as e:
            raise ApiKeysFileError(f"{where}: {e}") from None
    limits = {}
    for field in ("requests_per_minute", "tokens_per_minute"):
        value = entry.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise ApiKeysFileError(f"{where}: '{field}' must be a positive number")
        limits[field] = None if value is None else float(value)
    return digest, Tenant(names["tenant"], names["namespace"], key_id=digest.hex(), **limits)


class ApiKeys:
    """The keys of one file, reloadable; `lookup` finds a presented key's tenant."""

    def __init__(self, path: str) -> None:
        """Raises ApiKeysFileError when the file cannot be read or parsed."""
        self.path = path
        self._stamp = self._file_stamp()
        self._entries = self._read()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> Tenant | None:
        """The tenant of `key`, or None; compares with every stored digest in constant time."""
        digest, found = key_digest(key), None
        for stored, tenant in self._entries:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    @property
    def tenants(self) -> list[Tenant]:
        return [tenant for _, tenant in self._entries]

    def reload(self) -> bool:
        """Read the file again; on any error keep the current keys, log it, and return False."""
        stamp = self._file_stamp_or_none()
        try:
            entries = self._read()
        except ApiKeysFileError as e:
            logger.error("API keys file %s not reloaded, keeping the %d current key(s): %s",
                         self.path, len(self._entries), e)
            self._stamp = stamp  # do not retry the same bad file on every poll
            return False
        self._entries, self._stamp = entries, stamp
        logger.info("API keys reloaded from %s: %d key(s)", self.path, len(entries))
        return True

    def reload_if_changed(self) -> bool:
        """Reload when the file (after symlinks) changed since the last read; True if reloaded."""
        stamp = self._file_stamp_or_none()
        if stamp == self._stamp:
            return False
        return self.reload()

    def _read(self) -> list[tuple[bytes, Tenant]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ApiKeysFileError(f"cannot read {self.path}: {e}") from None
        return parse_api_keys(text)

    def _file_stamp(self) -> tuple[int, int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise ApiKeysFileError(f"cannot read {self.path}: {e}") from None
        return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size

    def _file_stamp_or_none(self) -> tuple[int, int, int, int] | None:
        with contextlib.suppress(ApiKeysFileError):
            return self._file_stamp()
        return None


class _Bucket:
    __slots__ = ("rate", "capacity", "level", "stamp")

    def __init__(self, per_minute: float, now: float) -> None:
        self.rate, self.capacity, self.level, self.stamp = per_minute / 60.0, per_minute, per_minute, now

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.level

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.level) / self.rate)


class RateLimiter:
    """Token buckets per configured key: requests per minute and tokens per minute."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def admit(self, tenant: Tenant) -> None:
        """Take one request from `tenant`'s budget, or raise RateLimitedError."""
        now = self._clock()
        requests = self._bucket(tenant, "requests", tenant.requests_per_minute, now)
        tokens = self._bucket(tenant, "tokens", tenant.tokens_per_minute, now)
        if tokens is not None and tokens.refill(now) < 0:
            raise RateLimitedError(f"rate limit of {tenant.tokens_per_minute:g} tokens per minute reached",
                                   _ceil_s(tokens.seconds_until(0.0)))
        if requests is not None:
            if requests.refill(now) < 1:
                raise RateLimitedError(f"rate limit of {tenant.requests_per_minute:g} requests per minute reached",
                                       _ceil_s(requests.seconds_until(1.0)))
            requests.level -= 1

    def charge(self, tenant: Tenant, num_tokens: int) -> None:
        """Debit `num_tokens` (prompt + completion of a finished request) from the tenant's token bucket."""
        bucket = self._bucket(tenant, "tokens", tenant.tokens_per_minute, self._clock())
        if bucket is not None and num_tokens > 0:
            bucket.refill(self._clock())
            bucket.level -= num_tokens

    def retain(self, tenants: list[Tenant]) -> None:
        """Keep state only for these (the configured) keys' limits."""
        keep = {(t.key_id, kind) for t in tenants for kind, limit in
                (("requests", t.requests_per_minute), ("tokens", t.tokens_per_minute)) if limit is not None}
        for k in [k for k in self._buckets if k not in keep]:
            del self._buckets[k]

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    def _bucket(self, tenant: Tenant, kind: str, per_minute: float | None, now: float) -> _Bucket | None:
        if per_minute is None:
            return None
        bucket = self._buckets.get((tenant.key_id, kind))
        if bucket is None or bucket.capacity != per_minute:  # new key, or its limit changed
            bucket = self._buckets[(tenant.key_id, kind)] = _Bucket(per_minute, now)
        return bucket


def _ceil_s(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` value (None when absent or of another scheme)."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


@dataclass(frozen=True, slots=True)
class Grant:
    """An admitted caller: the cache namespace its requests use, and its tenant (None without keys)."""

    namespace: str
    tenant: Tenant | None = None


class Gate:
    """What the frontends ask: who is calling (`authenticate`), may they use this tenant and are
    they within their limits (`admit`), and what did their request cost (`meter`). Without keys it
    lets everything through and the client's tenant is the namespace (as before keys existed)."""

    def __init__(self, keys: ApiKeys | None = None, limiter: RateLimiter | None = None) -> None:
        self.keys = keys
        self.limiter = limiter or RateLimiter()
        self.on_refuse = None
        """on_refuse(reason) for each refusal: "unauthenticated", "permission_denied", "rate_limited"."""

    def _refused(self, reason: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(reason)

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The caller's tenant (None when keys are off); raises AuthenticationError."""
        if self.keys is None:
            return None
        key = bearer_key(authorization)
        tenant = self.keys.lookup(key) if key is not None else None
        if tenant is None:
            self._refused("unauthenticated")
            raise AuthenticationError("missing API key: send 'Authorization: Bearer KEY'" if key is None
                                      else "incorrect API key provided")
        return tenant

    def admit(self, tenant: Tenant | None, requested_tenant: str = "") -> Grant:
        """The grant of an authenticated caller's request. Raises PermissionDeniedError when the
        request names another tenant, RateLimitedError past the key's limits."""
        if tenant is None:
            return Grant(requested_tenant)
        if requested_tenant and requested_tenant != tenant.name:
            self._refused("permission_denied")
            raise PermissionDeniedError("the request's tenant is not the API key's tenant")
        try:
            self.limiter.admit(tenant)
        except RateLimitedError:
            self._refused("rate_limited")
            raise
        return Grant(tenant.namespace, tenant)

    def reload_keys(self) -> bool:
        """Reload the keys file if it changed (False without keys, or when unchanged / bad)."""
        if self.keys is None or not self.keys.reload_if_changed():
            return False
        self.limiter.retain(self.keys.tenants)
        return True

    def force_reload(self) -> bool:
        """Reload the keys file now (SIGHUP)."""
        if self.keys is None or not self.keys.reload():
            return False
        self.limiter.retain(self.keys.tenants)
        return True

    async def meter(self, grant: Grant, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """Pass `deltas` through; when they end, debit the tokens used: prompt + completion from the
        last delta's usage, or the tokens streamed so far when the request ended early."""
        used = 0
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    used += len(delta.token_ids)
                    if delta.finished and delta.usage is not None:
                        used = delta.usage.prompt_tokens + delta.usage.completion_tokens
                    yield delta
        finally:
            if grant.tenant is not None:
                self.limiter.charge(grant.tenant, used)
