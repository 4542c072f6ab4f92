"""Fetch the http(s) image URLs of a chat request, behind the router's `--allow-image-urls`.

OpenAI's `image_url` content parts may name an image by URL. The router fetches each one before it
tokenizes the prompt and replaces the part by the image's bytes (`{"type": "image", "data": ...}`,
the gRPC API's own part), so the rest of the path (checks, content hash, placeholder ids, workers)
sees exactly what a data URL gives. Fetching is off unless the router allows it: a server that
fetches what clients name can be made to reach hosts the client cannot (SSRF), so
`image_url_domains` can restrict it to listed hosts.

Limits (each failure is a 400 naming the URL's host and the reason): a total time per image, the
router's image byte limit (read as it streams: a larger body is cut off, whatever its
Content-Length says), status 200 only, redirects not followed (they could leave the allowed hosts),
and the fetches of one request run concurrently.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from kvweave.errors import InvalidRequestError
from kvweave.images import ImageLimits

DEFAULT_FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ImageFetchConfig:
    limits: ImageLimits
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    domains: tuple[str, ...] = ()
    """Hosts images may be fetched from (a name matches itself and its subdomains); empty: any."""

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return not self.domains or any(host == d or host.endswith("." + d) for d in self.domains)


def parse_domains(text: str | None) -> tuple[str, ...]:
    """"a.com, b.org" -> ("a.com", "b.org")."""
    return tuple(d.strip().lower().rstrip(".") for d in (text or "").split(",") if d.strip())


def _http_url(part: Any) -> str | None:
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return None
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if isinstance(url, str) and url.split(":", 1)[0].lower() in ("http", "https"):
        return url
    return None


def has_image_urls(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(_http_url(p) for p in m["content"])
        for m in messages)


class ImageFetcher:
    """Replaces http(s) image parts by the fetched bytes; one aiohttp session for the router's life."""

    def __init__(self, config: ImageFetchConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def resolve(self, messages: list) -> list:
        """`messages` with every http(s) `image_url` part replaced by an image part holding the bytes
        (unchanged when there is none, or when fetching is off: the image checks then refuse them)."""
        if not self.config.limits.allow_http_urls or not has_image_urls(messages):
            return messages
        jobs: dict[tuple[int, int], asyncio.Task] = {}
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            for j, part in enumerate(content if isinstance(content, list) else ()):
                url = _http_url(part)
                if url is not None:
                    jobs[(i, j)] = asyncio.ensure_future(self.fetch(url, f"messages[{i}].content[{j}]"))
        try:
            await asyncio.gather(*jobs.values())
        finally:
            for job in jobs.values():
                job.cancel()
        out = []
        for i, message in enumerate(messages):
            if not any(k[0] == i for k in jobs):
                out.append(message)
                continue
            content = [{"type": "image", "data": jobs[(i, j)].result()} if (i, j) in jobs else part
                       for j, part in enumerate(message["content"])]
            out.append({**message, "content": content})
        return out

    async def fetch(self, url: str, where: str) -> bytes:
        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            host = ""
        if not host:
            raise InvalidRequestError(f"{where}: malformed image URL", where)
        if not self.config.allows(host):
            raise InvalidRequestError(f"{where}: image URLs from {host[:80]} are not allowed on this server "
                                      f"(allowed: {', '.join(self.config.domains)})", where)
        limit = self.config.limits.max_bytes
        try:
            async with asyncio.timeout(self.config.timeout_s):
                async with self._client().get(url, allow_redirects=False) as resp:
                    if resp.status != 200:
                        what = "a redirect (not followed)" if 300 <= resp.status < 400 else f"HTTP {resp.status}"
                        raise InvalidRequestError(f"{where}: fetching the image from {host[:80]} gave {what}", where)
                    data = bytearray()
                    async for piece in resp.content.iter_chunked(1 << 16):
                        data += piece
                        if len(data) > limit:
                            raise InvalidRequestError(f"{where}: the image at {host[:80]} is larger than the "
                                                      f"{limit} bytes allowed", where)
                    return bytes(data)
        except InvalidRequestError:
            raise
        except TimeoutError:
            raise InvalidRequestError(f"{where}: fetching the image from {host[:80]} took longer than "
                                      f"{self.config.timeout_s:g} s", where) from None
        except (aiohttp.ClientError, ValueError) as e:
            raise InvalidRequestError(f"{where}: cannot fetch the image from {host[:80]}: "
                                      f"{type(e).__name__}", where) from None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(auto_decompress=True, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
