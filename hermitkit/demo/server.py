"""The demo server: a threaded HTTP server on loopback, started in the background or in the foreground."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from http.server import ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import Any

from hermitkit.demo.faults import FaultRule, parse_fault_rules
from hermitkit.demo.handler import _DemoState, _Handler

logger = logging.getLogger("hermitkit.demo")

DEFAULT_DEMO_PORT = 8765
DEFAULT_CONTEXT_LENGTH = 32768


class _DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Runs open many connections at once; the default backlog of 5 would refuse some.
    request_queue_size = 256
    demo: DemoServer
    state: _DemoState
    stopping: threading.Event

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall without DNS.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("demo server: connection from %s ended with an error", client_address, exc_info=True)


class _DemoHTTPServerV6(_DemoHTTPServer):
    address_family = socket.AF_INET6


def _loopback_host(host: str) -> str:
    """Return ``host`` as a loopback IP address, or raise ValueError."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"Demo server host {host!r} is not an IP address: use 127.0.0.1, ::1 or localhost."
        ) from None
    if not address.is_loopback:
        raise ValueError(
            f"Demo server host {host!r} is not a loopback address: the demo server only "
            "listens on 127.0.0.1, ::1 or localhost, so that nothing outside this machine reaches it."
        )
    return str(address)


class DemoServer:
    """The offline demo endpoint, served from a background thread on loopback."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_s: float = 0.0,
        model_latency_s: dict[str, float] | None = None,
        faults: list[FaultRule] | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        require_key: str | None = None,
    ) -> None:
        self.host = _loopback_host(host)
        if not 0 <= port <= 65535:
            raise ValueError(f"Demo server port {port} is invalid: use 0 (any free port) to 65535.")
        if context_length < 1:
            raise ValueError(f"context_length={context_length} is invalid: use 1 or more tokens.")

        self._requested_port = port
        self.latency_s = latency_s
        self.model_latency_s = dict(model_latency_s or {})
        self.context_length = context_length
        self.require_key = require_key
        self._state = _DemoState(list(faults or []))
        self._server: _DemoHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def __repr__(self) -> str:
        state = "running" if self._server is not None else "stopped"
        return f"DemoServer(host={self.host!r}, port={self.port}, {state})"

    @property
    def port(self) -> int:
        """Bound port (the requested one until the server starts)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def received_authorization(self) -> list[str]:
        """Authorization header values received so far, for tests about key hygiene."""
        with self._state.lock:
            return list(self._state.authorization)

    def start(self) -> DemoServer:
        """Bind and serve from a daemon thread. Returns self."""
        if self._server is not None:
            return self
        server_class = _DemoHTTPServerV6 if ":" in self.host else _DemoHTTPServer
        server = server_class((self.host, self._requested_port), _Handler)
        server.demo = self
        server.state = self._state
        server.stopping = self._stopping
        self._stopping.clear()

        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="hermitkit-demo", daemon=True
        )
        self._thread.start()
        logger.info("Demo server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Handler threads in a fault delay wake up."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        logger.info("Demo server on port %s stopped", server.server_address[1])

    def wait(self) -> None:
        """Block until stop() is called from another thread."""
        while self._server is not None and not self._stopping.wait(0.5):
            pass

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counts of chat requests per model, faults applied per kind and model-list requests."""
        return self._state.snapshot()

    def add_rule(self, rule: FaultRule) -> None:
        """Add a fault rule while the server runs."""
        with self._state.lock:
            self._state.rules.append([rule, 0])

    def queue_faults(self, faults: Iterable[FaultRule | str], model: str | None = None) -> int:
        """Queue faults for the next matching requests, in order. Returns the queue length.

        Strings are fault kinds aimed at ``model``; FaultRule objects keep their own model.
        """
        rules = [FaultRule(kind=item, model=model) if isinstance(item, str) else item for item in faults]
        with self._state.lock:
            self._state.queue.extend(replace(rule, rate=None, every=None, first=None) for rule in rules)
            return len(self._state.queue)

    def clear_faults(self) -> int:
        """Drop all queued faults (rules given at start stay). Returns how many were dropped."""
        with self._state.lock:
            cleared = len(self._state.queue)
            self._state.queue.clear()
            return cleared


def serve_forever(
    host: str = "127.0.0.1",
    port: int = DEFAULT_DEMO_PORT,
    *,
    faults: Iterable[FaultRule | str] = (),
    on_ready: Callable[[DemoServer], None] | None = None,
    **kwargs: Any,
) -> None:
    """Run a demo server in the foreground until Ctrl-C.

    ``faults`` takes FaultRule objects or strings such as ``"429:rate=0.1"``; the other
    keyword arguments go to DemoServer. ``on_ready`` is called once the port is bound;
    without it the base URL is printed to standard output.
    """
    server = DemoServer(host, port, faults=parse_fault_rules(faults), **kwargs).start()
    try:
        if on_ready is not None:
            on_ready(server)
        else:
            print(f"hermitkit demo server on {server.base_url} (scripted models that describe "
                  "no real model). Press Ctrl-C to stop.", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
