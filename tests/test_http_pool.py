"""ShardedTransport and its asyncio network backend, against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
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
from hermitkit.http_pool import ShardedTransport

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


def _exception_chain(exc: BaseException) -> list[type[BaseException]]:
    chain: list[type[BaseException]] = []
    current: BaseException | None = exc
    while current is not None:
        chain.append(type(current))
        current = current.__cause__ or current.__context__
    return chain


def test_transport_spreads_requests_over_shards(demo: DemoServer) -> None:
    transport = ShardedTransport(max_connections=20, shard_connections=8)
    url = f"{demo.base_url}/chat/completions"

    async def main() -> list[httpx.Response]:
        try:
            return await asyncio.gather(*(_post(transport, url) for _ in range(60)))
        finally:
            await transport.aclose()

    responses = asyncio.run(main())

    assert transport.shard_count == 3
    assert [response.status_code for response in responses] == [200] * 60
    assert all(response.json()["choices"][0]["message"]["content"] for response in responses)
    assert transport.in_flight == 0


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
        transport = ShardedTransport(max_connections=2)
        try:
            return await _post(transport, f"http://127.0.0.1:{port}/v1/chat/completions")
        finally:
            await transport.aclose()

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
        transport = ShardedTransport(max_connections=1)
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
        transport = ShardedTransport(max_connections=1)
        try:
            await _post(transport, f"http://127.0.0.1:{port}/v1/chat/completions", timeout_s=0.2)
        finally:
            await transport.aclose()

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
        transport = ShardedTransport(max_connections=1)
        try:
            await _post(transport, f"http://127.0.0.1:{port}/v1/chat/completions")
        finally:
            await transport.aclose()

    with _ServerThread(Handler) as server, pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(main(server.port))


def test_transport_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        transport = ShardedTransport(max_connections=1)
        try:
            await _post(transport, f"http://127.0.0.1:{port}/v1/chat/completions")
        finally:
            await transport.aclose()

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
        transport = ShardedTransport(max_connections=2, ssl_context=client_context)
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
        transport = ShardedTransport(max_connections=1)
        try:
            await _post(transport, f"https://127.0.0.1:{port}/v1/chat/completions")
        finally:
            await transport.aclose()

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
