"""A Redis connection that pipelines concurrent commands: the router's hot read of the KV index.

redis-py's asyncio client takes a pooled connection per command, writes it, waits for its reply,
and gives the connection back: on the 2-core development machine ~100-200 us of the event loop's
time per call, more than the index lookup's Lua script costs Redis itself (~60 us). A router runs
one lookup per request, and concurrent requests' lookups are independent reads, so this client
sends them down ONE connection: the commands issued in one turn of the event loop go out in one
write at the end of that turn (one system call, not one per command); Redis answers in order; one
`data_received` parses every reply that has arrived with hiredis and resolves the waiting futures
in order. Nothing waits for a batch to fill, so a lone lookup is not delayed.

Errors are redis-py's (`redis.RedisError` subclasses), so callers handle both clients alike:
an error reply is `ResponseError` for its command only; a connection that fails or closes fails
every command in flight with `ConnectionError`, and the next command reconnects; a command not
answered within `timeout_s` closes the connection (its replies can no longer be matched) and fails
the commands in flight with `TimeoutError`, as a redis-py socket timeout would.

Serves `redis://` and `unix://` URLs (with password, username and db). `rediss://` (TLS) is not
handled here: `connect_pipelined` returns None for it and callers keep using redis-py.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Sequence

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def connect_pipelined(url: str, connect_timeout_s: float = 2.0, timeout_s: float = 2.0) -> PipelinedRedis | None:
    """A `PipelinedRedis` for `url` (it connects on its first command), or None for a URL it does not
    serve (TLS)."""
    params = parse_url(url)
    if params.get("connection_class") is SSLConnection:
        return None
    return PipelinedRedis(params, connect_timeout_s, timeout_s)


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedRedis) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self.pending: collections.deque[tuple[asyncio.Future, float]] = collections.deque()
        self.lost: Exception | None = None
        self.out: list[bytes] = []
        """Commands packed this turn of the event loop, not yet written."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        try:
            while (reply := self.reader.gets()) is not False:
                future = pending.popleft()[0]
                if not future.done():  # its caller may have been cancelled
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except (InvalidResponse, IndexError) as e:  # garbage, or a reply nobody asked for
            self.abort(RedisConnectionError(f"Redis protocol error: {e!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(self.lost or RedisConnectionError(f"Redis connection closed: {exc or 'by the server'}"))

    def abort(self, error: Exception) -> None:
        self.lost = error
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows, and fails what is in flight
        self.fail(error)

    def fail(self, error: Exception) -> None:
        self.lost = self.lost or error
        while self.pending:
            future = self.pending.popleft()[0]
            if not future.done():
                future.set_exception(error)
        self.owner.lost(self)

    def send(self, packed: bytes, deadline: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((future, deadline))
        if not self.out:  # the first command of this turn of the event loop: write them all after it
            loop.call_soon(self.flush)
        self.out.append(packed)
        return future

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


class PipelinedRedis:
    """One connection; commands from any number of tasks in flight on it at once (see above)."""

    def __init__(self, params: dict, connect_timeout_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self.params = params
        self.connect_timeout_s, self.timeout_s = connect_timeout_s, timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    async def execute(self, *args) -> object:
        """Send one command (bytes, str and int arguments) and return its reply."""
        proto = self._proto if self._proto is not None else await self._connect()
        future = proto.send(hiredis.pack_command(args), time.monotonic() + self.timeout_s)
        if self._watchdog is None:
            self._arm()
        return await future

    async def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._proto is not None:
            self._proto.abort(RedisConnectionError("Redis connection closed by the client"))

    def lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("this Redis connection is closed")
        if self._connecting is None:  # one connect, however many commands wait for it
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop, p = asyncio.get_running_loop(), self.params
        try:
            if p.get("connection_class") is UnixDomainSocketConnection:
                opening = loop.create_unix_connection(lambda: _Protocol(self), p["path"])
            else:
                opening = loop.create_connection(lambda: _Protocol(self), p.get("host", "localhost"),
                                                 p.get("port", 6379))
            _, proto = await asyncio.wait_for(opening, self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            where = p.get("path") or f"{p.get('host', 'localhost')}:{p.get('port', 6379)}"
            raise RedisConnectionError(f"cannot connect to Redis at {where}: {e!r}") from None
        deadline = time.monotonic() + self.timeout_s
        hello = []
        if p.get("password") is not None:
            auth = ("AUTH", p["username"], p["password"]) if p.get("username") else ("AUTH", p["password"])
            hello.append(proto.send(hiredis.pack_command(auth), deadline))
        if p.get("db"):
            hello.append(proto.send(hiredis.pack_command(("SELECT", int(p["db"]))), deadline))
        try:
            await asyncio.wait_for(asyncio.gather(*hello), self.timeout_s)
        except (ResponseError, RedisConnectionError, asyncio.TimeoutError) as e:
            proto.abort(RedisConnectionError(f"Redis refused the connection's set-up: {e!r}"))
            raise RedisConnectionError(f"Redis refused the connection's set-up: {e!r}") from None
        self._proto = proto
        return proto

    def _arm(self) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s / 4, self._check)

    def _check(self) -> None:
        """Every timeout/4 while commands are in flight: time out the connection whose oldest
        command is overdue."""
        self._watchdog = None
        proto = self._proto
        if proto is None or not proto.pending:
            return
        if proto.pending[0][1] < time.monotonic():
            proto.abort(RedisTimeoutError(f"Redis did not answer within {self.timeout_s:g} s"))
            return
        self._arm()


class PipelinedScript:
    """A Lua script run by EVALSHA over a `PipelinedRedis` (EVAL once when Redis lacks it), called
    like redis-py's `Script`: `await script(keys=[...], args=[...])`."""

    def __init__(self, client: PipelinedRedis, source: str) -> None:
        self.client, self.source = client, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence = (), args: Sequence = ()) -> object:
        try:
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
            return await self.client.execute("EVAL", self.source, len(keys), *keys, *args)
