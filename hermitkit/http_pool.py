"""An httpx transport that spreads requests over several small httpcore connection pools.

httpcore 1.0's connection pool walks all of its connections on every request and
release, with a step inside that walk that is itself linear, so its CPU cost per
request grows with the square of the number of open connections. With 64 concurrent
requests one pool served about 120 requests a second on a 2-core AMD EPYC (httpcore
1.0.9; benchmarks/README.md has the script and numbers). Several pools of at most
``SHARD_CONNECTIONS`` connections keep every walk short while the sum of their limits
stays the same. The pools open their connections through ``AsyncioBackend``.
"""

from __future__ import annotations

import functools
import math
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpcore
import httpx

from hermitkit.http_backend import AsyncioBackend

# Connections per shard. Above about 16 the quadratic walk shows in profiles again;
# below 4 the shards add bookkeeping without saving anything.
SHARD_CONNECTIONS = 8

# httpcore's exceptions and the httpx exceptions that callers catch. httpx keeps its own
# map private (httpx._transports.default), so this transport carries one. Subclasses
# come before their bases, so the first match is the most specific one.
_EXCEPTION_MAP: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """Return httpx's default TLS context (certifi's CA bundle), built once per process.

    Loading the CA bundle takes 20 to 40 ms, which a short batch would notice.
    """
    return httpx.create_ssl_context()


@contextmanager
def _httpx_exceptions() -> Iterator[None]:
    """Re-raise httpcore's exceptions as the matching httpx exceptions, chained."""
    try:
        yield
    except Exception as exc:
        for source, target in _EXCEPTION_MAP:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class ShardedTransport(httpx.AsyncBaseTransport):
    """Send each request through the shard with the fewest requests in flight.

    ``max_connections`` is the limit for all shards together. A request waits for a
    connection only when its shard is full; the least-loaded choice makes that happen
    only when nearly all shards are full. ``ssl_context`` defaults to httpx's
    (certifi's CA bundle), loaded on the first https request.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float | None = 5.0,
        shard_connections: int = SHARD_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
    ):
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections} is invalid: use 1 or more.")
        if shard_connections < 1:
            raise ValueError(f"shard_connections={shard_connections} is invalid: use 1 or more.")

        self._count = math.ceil(max_connections / shard_connections)
        self._per_shard = math.ceil(max_connections / self._count)
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        # The first request opens the pools, because its URL scheme decides whether TLS is needed.
        self._shards: list[httpcore.AsyncConnectionPool] = []
        self._in_flight = [0] * self._count

    @property
    def shard_count(self) -> int:
        return self._count

    @property
    def in_flight(self) -> int:
        """Requests sent whose response body is not closed yet, over all shards."""
        return sum(self._in_flight)

    def _open_shards(self, scheme: bytes) -> None:
        context = self._ssl_context
        if context is None and scheme == b"https":
            context = default_ssl_context()
        # Without a context, httpcore builds its own for each TLS connection. That only
        # happens when a transport opened for plain HTTP later receives an https URL.
        backend = AsyncioBackend()
        self._shards = [
            httpcore.AsyncConnectionPool(
                ssl_context=context,
                max_connections=self._per_shard,
                max_keepalive_connections=self._per_shard,
                keepalive_expiry=self._keepalive_expiry,
                network_backend=backend,
            )
            for _ in range(self._count)
        ]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self._shards:
            self._open_shards(request.url.raw_scheme)
        index = min(range(len(self._in_flight)), key=self._in_flight.__getitem__)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]
            extensions=request.extensions,
        )

        self._in_flight[index] += 1
        try:
            with _httpx_exceptions():
                core_response = await self._shards[index].handle_async_request(core_request)
        except BaseException:
            self._in_flight[index] -= 1
            raise

        # The connection stays busy until the body is read and the stream closed.
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_ReleasingStream(core_response.stream, self._in_flight, index),  # type: ignore[arg-type]
            extensions=core_response.extensions,
        )

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that maps httpcore's errors and lowers its shard's count once, when closed."""

    def __init__(self, stream: AsyncIterator[bytes], in_flight: list[int], index: int):
        self._stream = stream
        self._in_flight = in_flight
        self._index = index
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_exceptions():
            async for chunk in self._stream:  # type: ignore[attr-defined]
                yield chunk

    async def aclose(self) -> None:
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            if not self._released:
                self._released = True
                self._in_flight[self._index] -= 1
