"""PooledTransport and its asyncio network backend, against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from hermitkit.client import OpenAICompatibleClient, environment_proxy
from hermitkit.demo import STEADY_MODEL, DemoServer
from hermitkit.errors import ProviderError
from hermitkit.http_pool import PooledTransport

HELLO = [{"role": "user", "content": "You have full autonomy."}]
COMPLETION = {
    "id": "gen-1",
    "model": STEADY_MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "{hello}"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2},
}


@pytest.fixture
def demo() -> Iterator[DemoServer]:
    with DemoServer() as server:
        yield server


class _ServerThread:
    """A ThreadingHTTPServer with ``handler`` on a free loopback port, served from a thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext | None = None):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def __enter__(self) -> _ServerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send_body(handler: BaseHTTPRequestHandler, body: bytes, *, close: bool = False) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    if close:
        handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)


async def _post(transport: httpx.AsyncBaseTransport, url: str, timeout_s: float = 10.0) -> httpx.Response:
    timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": None}
    request = httpx.Request("POST", url, json={"model": STEADY_MODEL, "messages": HELLO}, extensions={"timeout": timeouts})
    response = await transport.handle_async_request(request)
    try:
        await response.aread()
    finally:
        await response.aclose()
    return response


async def _post_once(url: str, timeout_s: float = 10.0, max_connections: int = 1) -> httpx.Response:
    """Post one request through a new transport, then close the transport."""
    transport = PooledTransport(max_connections=max_connections)
    try:
        return await _post(transport, url, timeout_s)
    finally:
        await transport.aclose()


def _exception_chain(exc: BaseException) -> list[type[BaseException]]:
    chain: list[type[BaseException]] = []
    current: BaseException | None = exc
    while current is not None:
        chain.append(type(current))
        current = current.__cause__ or current.__context__
    return chain


class _CountingHandler(BaseHTTPRequestHandler):
    """Replies with COMPLETION after ``delay_s``, recording the client port of each request."""

    protocol_version = "HTTP/1.1"
    ports: list[int] = []
    delay_s = 0.0
    in_flight = 0
    max_in_flight = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).ports.append(self.client_address[1])
            type(self).in_flight += 1
            type(self).max_in_flight = max(type(self).max_in_flight, type(self).in_flight)
        time.sleep(self.delay_s)
        with self.lock:
            type(self).in_flight -= 1
        _send_body(self, json.dumps(COMPLETION).encode())

    def log_message(self, *args: Any) -> None:
        pass


def _counting_handler(delay_s: float) -> type[_CountingHandler]:
    return type("Handler", (_CountingHandler,), {"ports": [], "delay_s": delay_s, "in_flight": 0, "max_in_flight": 0, "lock": threading.Lock()})


def test_transport_keeps_to_its_connection_limit() -> None:
    handler = _counting_handler(0.02)
    transport = PooledTransport(max_connections=4)

    async def main(port: int) -> list[httpx.Response]:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            return await asyncio.gather(*(_post(transport, url) for _ in range(40)))
        finally:
            assert transport.in_flight == 0
            assert transport.idle_connections == 4
            await transport.aclose()

    with _ServerThread(handler) as server:
        responses = asyncio.run(main(server.port))

    assert [response.status_code for response in responses] == [200] * 40
    assert all(response.json()["choices"][0]["message"]["content"] == "{hello}" for response in responses)
    assert handler.max_in_flight == 4
    assert len(set(handler.ports)) == 4
    assert transport.idle_connections == 0


def test_transport_keepalive_expiry() -> None:
    handler = _counting_handler(0.0)
    transport = PooledTransport(max_connections=2, keepalive_expiry=0.3)

    async def main(port: int) -> None:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            for _ in range(3):
                await _post(transport, url)
            await asyncio.sleep(0.5)
            await _post(transport, url)
        finally:
            await transport.aclose()

    with _ServerThread(handler) as server:
        asyncio.run(main(server.port))

    first, second, third, after_expiry = handler.ports
    assert first == second == third
    assert after_expiry != first


def test_transport_reads_chunked_and_gzip_bodies() -> None:
    body = json.dumps(COMPLETION).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            packed = gzip.compress(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(packed), 7):
                chunk = packed[start : start + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: Any) -> None:
            pass

    async def main(port: int) -> list[httpx.Response]:
        transport = PooledTransport(max_connections=1)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            # The second request reuses the connection, so the chunked body ended cleanly.
            return [await _post(transport, url), await _post(transport, url)]
        finally:
            await transport.aclose()

    with _ServerThread(Handler) as server:
        responses = asyncio.run(main(server.port))

    assert [response.json() for response in responses] == [COMPLETION, COMPLETION]


def test_cancelled_request_frees_slot() -> None:
    handler = _counting_handler(0.5)
    transport = PooledTransport(max_connections=1)

    async def main(port: int) -> int:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            slow = asyncio.ensure_future(_post(transport, url))
            await asyncio.sleep(0.1)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            assert transport.in_flight == 0
            # The cancelled request's connection is closed, not handed to the next one.
            assert transport.idle_connections == 0
            return (await _post(transport, url)).status_code
        finally:
            await transport.aclose()

    with _ServerThread(handler) as server:
        assert asyncio.run(main(server.port)) == 200
    assert len(set(handler.ports)) == 2


def test_transport_pool_timeout() -> None:
    handler = _counting_handler(0.5)
    transport = PooledTransport(max_connections=1)

    async def main(port: int) -> None:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        request = httpx.Request("POST", url, json={}, extensions={"timeout": {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 0.1}})
        try:
            slow = asyncio.ensure_future(_post(transport, url))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await transport.handle_async_request(request)
            await slow
        finally:
            await transport.aclose()

    with _ServerThread(handler) as server:
        asyncio.run(main(server.port))


def test_transport_rejects_other_schemes() -> None:
    async def main() -> None:
        await _post_once("ftp://127.0.0.1:21/v1/chat/completions")

    with pytest.raises(httpx.UnsupportedProtocol, match="use http or https"):
        asyncio.run(main())


def test_transport_reads_large_body() -> None:
    # Larger than the backend's read buffer limit, so reading pauses and resumes.
    payload = {"blob": "x" * (3 * 1024 * 1024)}
    body = json.dumps(payload).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            _send_body(self, body)

        def log_message(self, *args: Any) -> None:
            pass

    async def main(port: int) -> httpx.Response:
        return await _post_once(f"http://127.0.0.1:{port}/v1/chat/completions", max_connections=2)

    with _ServerThread(Handler) as server:
        response = asyncio.run(main(server.port))

    assert response.json() == payload


def test_transport_replaces_connection_closed_by_server() -> None:
    connections: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        # Keeps the connection open after the reply without saying so, then drops it
        # while the client considers it idle and reusable.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            connections.append(self.client_address[1])
            self.rfile.read(int(self.headers["Content-Length"]))
            _send_body(self, json.dumps(COMPLETION).encode())
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    async def main(port: int) -> list[int]:
        transport = PooledTransport(max_connections=1)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            first = await _post(transport, url)
            await asyncio.sleep(0.2)
            second = await _post(transport, url)
            return [first.status_code, second.status_code]
        finally:
            await transport.aclose()

    with _ServerThread(Handler) as server:
        statuses = asyncio.run(main(server.port))

    assert statuses == [200, 200]
    assert len(set(connections)) == 2


def test_transport_read_timeout() -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            time.sleep(1.0)

        def log_message(self, *args: Any) -> None:
            pass

    async def main(port: int) -> None:
        await _post_once(f"http://127.0.0.1:{port}/v1/chat/completions", timeout_s=0.2)

    with _ServerThread(Handler) as server, pytest.raises(httpx.ReadTimeout):
        asyncio.run(main(server.port))


def test_transport_server_disconnect() -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    async def main(port: int) -> None:
        await _post_once(f"http://127.0.0.1:{port}/v1/chat/completions")

    with _ServerThread(Handler) as server, pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(main(server.port))


def test_transport_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        await _post_once(f"http://127.0.0.1:{port}/v1/chat/completions")

    with pytest.raises(httpx.ConnectError) as caught:
        asyncio.run(main())
    assert ConnectionRefusedError in _exception_chain(caught.value)


def test_client_reports_unknown_host_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may not query a name server, so the resolver's error is simulated.
    def no_such_host(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    client = OpenAICompatibleClient("http://models.example.invalid/v1", max_retries=5, backoff_base_s=10.0)

    async def main() -> None:
        async with client:
            await client.chat(STEADY_MODEL, HELLO)

    started = time.monotonic()
    with pytest.raises(ProviderError, match="does not resolve") as caught:
        asyncio.run(main())
    assert caught.value.retryable is False
    assert time.monotonic() - started < 5.0


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("The TLS test needs the openssl command line tool (Debian package openssl).")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def test_transport_speaks_tls(tls_files: tuple[Path, Path]) -> None:
    key, cert = tls_files
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    seen: list[bool] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            seen.append(isinstance(self.connection, ssl.SSLSocket))
            self.rfile.read(int(self.headers["Content-Length"]))
            _send_body(self, json.dumps(COMPLETION).encode())

        def log_message(self, *args: Any) -> None:
            pass

    async def main(port: int) -> list[str | None]:
        transport = PooledTransport(max_connections=2, ssl_context=client_context)
        client = OpenAICompatibleClient(f"https://127.0.0.1:{port}/v1", transport=transport, max_retries=0)
        async with client:
            replies = [await client.chat(STEADY_MODEL, HELLO) for _ in range(3)]
        return [reply.content for reply in replies]

    with _ServerThread(Handler, server_context) as server:
        contents = asyncio.run(main(server.port))

    assert contents == ["{hello}"] * 3
    assert seen == [True, True, True]


def test_transport_rejects_untrusted_certificate(tls_files: tuple[Path, Path]) -> None:
    key, cert = tls_files
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    async def main(port: int) -> None:
        # The default context trusts certifi's CA bundle, which did not sign this certificate.
        await _post_once(f"https://127.0.0.1:{port}/v1/chat/completions")

    with _ServerThread(Handler, server_context) as server, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(main(server.port))


def test_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert environment_proxy("https://openrouter.ai/api/v1") is None

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert environment_proxy("https://openrouter.ai/api/v1") == "http://proxy.internal:3128"
    assert environment_proxy("http://127.0.0.1:8765/v1") is None

    monkeypatch.setenv("NO_PROXY", "openrouter.ai")
    assert environment_proxy("https://openrouter.ai/api/v1") is None


def test_client_sends_through_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    request_lines: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        # Replies as the upstream would, so the test needs no second server.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            request_lines.append(self.requestline)
            self.rfile.read(int(self.headers["Content-Length"]))
            _send_body(self, json.dumps(COMPLETION).encode())

        def log_message(self, *args: Any) -> None:
            pass

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    with _ServerThread(Proxy) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        client = OpenAICompatibleClient("http://upstream.example:9/v1", max_retries=0)

        async def main() -> str | None:
            async with client:
                return (await client.chat(STEADY_MODEL, HELLO)).content

        content = asyncio.run(main())

    assert content == "{hello}"
    assert request_lines == ["POST http://upstream.example:9/v1/chat/completions HTTP/1.1"]


def test_invalid_header_value_not_echoed(demo: DemoServer) -> None:
    transport = PooledTransport(max_connections=1)
    url = httpx.URL(f"{demo.base_url}/chat/completions")
    headers = [(b"Host", url.netloc), (b"Authorization", b"Bearer sk-hidden\nx"), (b"Content-Length", b"2")]

    async def main() -> None:
        try:
            await transport.send("POST", url, headers, b"{}", {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": None})
        finally:
            await transport.aclose()

    with pytest.raises(httpx.LocalProtocolError) as caught:
        asyncio.run(main())
    assert "sk-hidden" not in str(caught.value)
    assert "not allow" in str(caught.value)
