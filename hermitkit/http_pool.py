"""An httpx transport that keeps HTTP/1.1 connections open and speaks to them through h11.

hermitkit sends many small JSON requests at once, up to one per run in flight. httpcore
1.0's connection pool, with which httpx serves them, spent most of the client's CPU time
per request on the benchmark machine (benchmarks/README.md has the profiles). Its pool
walks every connection on each request and release. Each request also takes anyio
locks and cancel scopes, which look up the running async library every time. This
transport keeps the parts that do the work, h11 for the HTTP/1.1 messages and asyncio
transports for the sockets (``http_backend``). It replaces the bookkeeping around them
with a semaphore and a stack of idle connections per origin.

It reads each response body whole before it returns, because hermitkit's client never
streams. It does not speak to proxies: ``client._default_transport`` uses httpx's own
transport when a proxy is configured.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
import h11
import httpcore
import httpx

from hermitkit.http_backend import AsyncioBackend, AsyncioStream

# Bytes asked of the socket per read; a reply of a few kilobytes arrives in one.
READ_SIZE = 64 * 1024

# The exceptions of httpcore (raised by the network backend) and h11, and the httpx
# exceptions that callers catch. Subclasses come before their bases, so the first match is the most
# specific one.
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
    (h11.RemoteProtocolError, httpx.RemoteProtocolError),
    (h11.LocalProtocolError, httpx.LocalProtocolError),
)


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """Return httpx's default TLS context (certifi's CA bundle), built once per process.

    Loading the CA bundle takes 20 to 40 ms, which a short batch would notice.
    """
    return httpx.create_ssl_context()


@contextmanager
def _httpx_exceptions() -> Iterator[None]:
    """Re-raise the backend's and h11's exceptions as the matching httpx exceptions, chained."""
    try:
        yield
    except Exception as exc:
        for source, target in _EXCEPTION_MAP:
            if isinstance(exc, source):
                raise target(str(exc) or type(exc).__name__) from exc
        raise


class _Connection:
    """One open HTTP/1.1 connection and its h11 state."""

    def __init__(self, stream: AsyncioStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def is_stale(self, now: float, keepalive_expiry: float | None) -> bool:
        """Return True when the connection may not carry another request."""
        if keepalive_expiry is not None and now - self.idle_since > keepalive_expiry:
            return True
        # Bytes or EOF on an idle connection mean that the server has closed it.
        return bool(self.stream.get_extra_info("is_readable"))

    def close(self) -> None:
        self.stream.close_now()


Origin = tuple[bytes, bytes, int]


class PooledTransport(httpx.AsyncBaseTransport):
    """Send requests over at most ``max_connections`` kept-alive HTTP/1.1 connections.

    A request waits for a free connection slot (the ``pool`` timeout) and then reuses
    the connection that was idle for the shortest time, or opens a new one. A connection
    returns to the pool only when its response was read to the end and neither side
    asked to close it. Idle connections older than ``keepalive_expiry`` seconds are
    closed instead of reused. ``ssl_context`` defaults to httpx's (certifi's CA bundle),
    loaded on the first https request.
    """

    def __init__(self, *, max_connections: int, keepalive_expiry: float | None = 5.0, ssl_context: ssl.SSLContext | None = None):
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections} is invalid: use 1 or more.")
        self.max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._backend = AsyncioBackend()
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._in_flight = 0
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Requests that hold a connection slot."""
        return self._in_flight

    @property
    def idle_connections(self) -> int:
        return sum(len(connections) for connections in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.send(request.method, request.url, request.headers.raw, request.content, request.extensions.get("timeout", {}))

    async def send(
        self, method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]], body: bytes, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        """Send one request and return its response with the body read.

        ``headers`` are sent as given, so they must hold Host and, with a body,
        Content-Length, as ``httpx.Request`` would set them. Building an
        ``httpx.Request`` for every call costs more than the rest of this method.
        """
        if self._closed:
            raise RuntimeError("This transport is closed; open a new one.")
        origin: Origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        if origin[0] not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"Request URL {str(url)!r} has scheme {url.scheme!r}; use http or https.")

        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout(f"No connection was free within {timeouts.get('pool')} s.") from None

        self._in_flight += 1
        connection: _Connection | None = None
        try:
            with _httpx_exceptions():
                connection = self._idle_connection(origin)
                if connection is None:
                    connection = await self._connect(origin, timeouts)
                status, response_headers, content, reusable = await self._exchange(connection, method, url.raw_path, headers, body, timeouts)
            if reusable and not self._closed:
                connection.idle_since = time.monotonic()
                self._idle.setdefault(origin, deque()).append(connection)
                connection = None
        finally:
            if connection is not None:
                connection.close()
            self._in_flight -= 1
            self._slots.release()

        return httpx.Response(status_code=status, headers=response_headers, stream=httpx.ByteStream(content), extensions={"http_version": b"HTTP/1.1"})

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.is_stale(now, self._keepalive_expiry):
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, timeouts: dict[str, float | None]) -> _Connection:
        scheme, host, port = origin
        stream = await self._backend.connect_tcp(host.decode("ascii"), port, timeout=timeouts.get("connect"))
        if scheme == b"https":
            context = self._ssl_context or default_ssl_context()
            try:
                stream = await stream.start_tls(context, server_hostname=host.decode("ascii"), timeout=timeouts.get("connect"))
            except BaseException:
                stream.close_now()
                raise
        return _Connection(stream)

    async def _exchange(
        self, connection: _Connection, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, timeouts: dict[str, float | None]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Send one request, read its whole response, and return it with whether the connection can be reused."""
        h11_connection = connection.h11
        try:
            data = h11_connection.send(h11.Request(method=method, target=target, headers=headers))
        except h11.LocalProtocolError:
            # h11's message repeats the offending value, which may be a secret such as an API key.
            raise httpx.LocalProtocolError("A request header name or value contains a character that HTTP does not allow.") from None
        if body:
            data += h11_connection.send(h11.Data(data=body))
        data += h11_connection.send(h11.EndOfMessage())
        await connection.stream.write(data, timeout=timeouts.get("write"))

        read_timeout = timeouts.get("read")
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = h11_connection.next_event()
            if event is h11.NEED_DATA:
                received = await connection.stream.read(READ_SIZE, timeout=read_timeout)
                if not received and h11_connection.their_state is h11.SEND_RESPONSE:
                    raise httpx.RemoteProtocolError("The server closed the connection without sending a response.")
                h11_connection.receive_data(received)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("The server closed the connection in the middle of its response.")

        assert response is not None
        reusable = h11_connection.our_state is h11.DONE and h11_connection.their_state is h11.DONE
        if reusable:
            h11_connection.start_next_cycle()
        return response.status_code, list(response.headers), b"".join(chunks), reusable

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

