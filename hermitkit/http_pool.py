"""An httpx transport that spreads requests over several small connection pools.

httpcore 1.0's connection pool walks all of its connections on every request and
release, with a step inside that walk that is itself linear, so its CPU cost per
request grows with the square of the number of open connections. With 64 concurrent
requests one pool served about 120 requests a second on a 2-core AMD EPYC (httpcore
1.0.9; benchmarks/README.md has the script and numbers). Several pools of at most
``SHARD_CONNECTIONS`` connections keep every walk short while the sum of their limits
stays the same.
"""

from __future__ import annotations

import math

import httpx

# Connections per shard. Above about 16 the quadratic walk shows in profiles again;
# below 4 the shards add bookkeeping without saving anything.
SHARD_CONNECTIONS = 8


class ShardedTransport(httpx.AsyncBaseTransport):
    """Send each request through the shard with the fewest requests in flight.

    ``max_connections`` is the limit for all shards together. A request waits for a
    connection only when its shard is full; the least-loaded choice makes that happen
    only when nearly all shards are full.
    """

    def __init__(self, *, max_connections: int, keepalive_expiry: float | None = 5.0, shard_connections: int = SHARD_CONNECTIONS):
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections} is invalid: use 1 or more.")
        if shard_connections < 1:
            raise ValueError(f"shard_connections={shard_connections} is invalid: use 1 or more.")

        count = math.ceil(max_connections / shard_connections)
        per_shard = math.ceil(max_connections / count)
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard, keepalive_expiry=keepalive_expiry)

        # Loading the CA bundle takes milliseconds, so all shards share one context.
        context = httpx.create_ssl_context()
        self._shards = [httpx.AsyncHTTPTransport(verify=context, limits=limits) for _ in range(count)]
        self._in_flight = [0] * count

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self._in_flight)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            response = await self._shards[index].handle_async_request(request)
        except BaseException:
            self._in_flight[index] -= 1
            raise

        # The connection stays busy until the body is read and the stream closed.
        response.stream = _ReleasingStream(response.stream, self._in_flight, index)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that lowers its shard's in-flight count once, when closed."""

    def __init__(self, stream: httpx.AsyncByteStream | httpx.SyncByteStream, in_flight: list[int], index: int):
        self._stream = stream
        self._in_flight = in_flight
        self._index = index
        self._released = False

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        async for chunk in self._stream:  # type: ignore[union-attr]
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()  # type: ignore[union-attr]
        finally:
            if not self._released:
                self._released = True
                self._in_flight[self._index] -= 1

