"""The sockets under ``http_pool.PooledTransport``: asyncio transports and protocols.

It keeps httpcore's network backend interface and exceptions, which ``http_pool`` maps
to httpx's. httpcore 1.0's own async backend goes through anyio, which enters a cancel
scope for every read and write. This one waits on one asyncio future per read and
bounds each wait with ``asyncio.timeout``. It opens TCP
connections and upgrades them to TLS; it has no Unix socket support, because hermitkit
never connects to one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore

# Reading pauses while this many received bytes wait to be parsed, so a huge reply
# cannot fill memory faster than the reader consumes it.
READ_BUFFER_LIMIT = 1024 * 1024


class _ConnectionProtocol(asyncio.Protocol):
    """Collect received bytes and wake the one reader that waits for them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.at_eof = False
        self.error: BaseException | None = None
        self.write_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_BUFFER_LIMIT and self.transport is not None and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.at_eof = True
        self._wake_reader()
        # False lets asyncio close the transport: an HTTP/1.1 peer that sent EOF
        # will not read anything more from this connection.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.at_eof = True
        self.error = exc
        self._wake_reader()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self, max_bytes: int) -> bytes:
        """Remove and return up to ``max_bytes`` buffered bytes."""
        data = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        if self._read_paused and len(self.buffer) <= READ_BUFFER_LIMIT // 2 and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    async def wait_readable(self) -> None:
        """Wait until bytes arrive or the connection ends."""
        while not self.buffer and not self.at_eof:
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None

    async def wait_writable(self) -> None:
        """Wait until the transport's write buffer has drained below its high-water mark."""
        while self.write_paused and not self.at_eof:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One TCP or TLS connection, read and written by one request at a time."""

    def __init__(self, transport: asyncio.Transport, protocol: _ConnectionProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.buffer and not protocol.at_eof:
            try:
                async with asyncio.timeout(timeout):
                    await protocol.wait_readable()
            except TimeoutError:
                raise httpcore.ReadTimeout(f"No data received within {timeout} s.") from None

        if protocol.buffer:
            return protocol.take(max_bytes)
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__) from protocol.error
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send ``buffer``, and wait only while the send buffer is above its high-water mark."""
        if not buffer:
            return
        if self._transport.is_closing():
            error = self._protocol.error
            raise httpcore.WriteError(str(error) if error else "The connection is closed.")

        self._transport.write(buffer)
        if self._protocol.write_paused:
            try:
                async with asyncio.timeout(timeout):
                    await self._protocol.wait_writable()
            except TimeoutError:
                raise httpcore.WriteTimeout(f"The send buffer did not drain within {timeout} s.") from None

    async def aclose(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Close the connection without waiting. asyncio still sends what is buffered."""
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(self._transport, self._protocol, ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            self._transport.abort()
            raise httpcore.ConnectTimeout(f"The TLS handshake did not finish within {timeout} s.") from None
        except (OSError, ssl.SSLError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc

        assert isinstance(transport, asyncio.Transport)
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Idle keep-alive connections are checked with this. Bytes or EOF on an idle
            # connection mean that the server closed it.
            return self._protocol.at_eof or bool(self._protocol.buffer)
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Open connections on the running asyncio event loop."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        local_addr = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(_ConnectionProtocol, host, port, local_addr=local_addr)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"Connecting to {host}:{port} took longer than {timeout} s.") from None
        except OSError as exc:
            # The OSError stays the cause, so callers can tell a host name that does
            # not resolve (socket.gaierror) from a refused connection.
            raise httpcore.ConnectError(str(exc)) from exc

        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # asyncio sets TCP_NODELAY on TCP sockets already. Setting it here keeps the
            # requirement visible: without it, a body sent after its headers waits for
            # the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
