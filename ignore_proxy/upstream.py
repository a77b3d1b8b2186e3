"""Forwarding: the one shared upstream client, and how requests and answers cross it."""

from __future__ import annotations

import http.cookiejar
from collections.abc import AsyncIterator, Iterable
from urllib.parse import parse_qsl

import httpx

from .config import Settings
from .transport import AiohttpTransport

RawHeaders = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# `Expect: 100-continue` was answered by our own server when the body was read; passed on,
# it would make the upstream client wait for a `100 Continue` some servers never send.
REQUEST_ONLY = frozenset({b"expect"})
# Dropped from answers the proxy rewrites: the new body gets its own length.
BODY_HEADERS = frozenset({b"content-length", b"content-encoding", b"transfer-encoding"})


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """One user's `Set-Cookie` must never ride along on another user's request."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


class _NeverStored(httpx.Cookies):
    """httpx hands every answer to the jar, wrapping it in urllib/email objects first
    (~10% of a tiny pass-through's CPU in a profile): skip that, there is nothing to keep."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def create_client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=settings.limits.max_connections,
        max_keepalive_connections=settings.limits.max_keepalive_connections,
        keepalive_expiry=30.0,
    )
    client = httpx.AsyncClient(
        base_url=settings.upstream,
        timeout=base_timeout(settings),
        limits=limits,
        cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
        follow_redirects=False,
        trust_env=False,
        # aiohttp underneath: httpcore was the bottleneck (see transport.py, README Benchmarks).
        transport=transport
        or AiohttpTransport(
            max_connections=settings.limits.max_connections,
            max_keepalive_connections=settings.limits.max_keepalive_connections,
            keepalive_expiry=30.0,
        ),
    )
    # Set directly: the `cookies` setter would wrap it in a plain Cookies again.
    client._cookies = _NeverStored(http.cookiejar.CookieJar(policy=_NoCookies()))
    return client


def base_timeout(settings: Settings) -> httpx.Timeout:
    t = settings.timeouts
    return httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool)


def timeout_for(settings: Settings, query_string: bytes) -> httpx.Timeout:
    """A long-poll (`?timeout=ms`) may stay silent for that long, plus the usual read timeout."""
    timeouts = settings.timeouts
    read = timeouts.read
    if b"timeout=" in query_string:
        for key, value in parse_qsl(query_string.decode("latin-1")):
            if key == "timeout" and value.isdigit():
                read += min(int(value) / 1000, timeouts.max_long_poll)
                break
    return httpx.Timeout(
        connect=timeouts.connect, read=read, write=timeouts.write, pool=timeouts.pool
    )


def hop_by_hop_names(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


def forwardable(
    headers: Iterable[tuple[bytes, bytes]], also_drop: frozenset[bytes] = frozenset()
) -> RawHeaders:
    """The end-to-end headers of a message, as raw pairs, repeated ones kept in order."""
    headers = list(headers)
    drop = hop_by_hop_names(headers) | also_drop
    return [(name, value) for name, value in headers if name.lower() not in drop]


def upstream_url(client: httpx.AsyncClient, raw_path: bytes, query_string: bytes) -> httpx.URL:
    """The upstream URL, from the raw path: `%23`, `%2F`, `%40` must arrive unchanged."""
    target = raw_path + (b"?" + query_string if query_string else b"")
    return client.base_url.copy_with(raw_path=target)


def build_request(
    method: str,
    url: httpx.URL,
    headers: RawHeaders,
    body: AsyncIterator[bytes] | bytes | None,
    timeout: httpx.Timeout,
) -> httpx.Request:
    # Built directly rather than with client.build_request so that the client's default
    # headers (User-Agent, Accept-Encoding, ...) are not added to what the user sent.
    return httpx.Request(
        method, url, headers=headers, content=body, extensions={"timeout": timeout.as_dict()}
    )
