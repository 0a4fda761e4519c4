"""Helpers shared by the benchmark scripts: demo server process, databases, output.

The scripts import this module by name, which works because Python puts the folder of
the script it runs (``benchmarks/``) on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POSTGRES_ENV = "HERMITKIT_BENCH_POSTGRES_URL"
DEMO_MODELS = ["demo/steady", "demo/wanderer", "demo/forgetful", "demo/confused"]
JUDGE_MODEL = "demo/judge"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def demo_server_process(latency_s: float, *, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Start ``hermitkit demo-server`` in its own process and yield its base URL.

    A separate process keeps the server's handler threads off the benchmarked
    process's GIL, as a real remote endpoint would be.
    """
    port = free_port()
    command = [sys.executable, "-m", "hermitkit.cli", "demo-server", "--port", str(port), "--latency", str(latency_s)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_listening(process, base_url, startup_timeout_s)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_listening(process: subprocess.Popen[bytes], base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"The demo server exited with code {process.returncode}: {stderr.strip()}")
        try:
            if httpx.get(f"{base_url}/models", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"The demo server at {base_url} did not respond within {timeout_s:g} s.")


def add_server_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server-url",
        default=None,
        help="Base URL of a demo server that is already running (e.g. http://127.0.0.1:8765/v1), "
        "started with the same --latency. Default: start one in a separate process.",
    )


@contextlib.contextmanager
def demo_server(args: argparse.Namespace, latency_s: float) -> Iterator[str]:
    """Yield the base URL of ``--server-url``, or of a demo server process started here.

    Prints the server's own time per request first (``server_overhead_ms``), so a slow
    server is not mistaken for a slow client.
    """
    if args.server_url:
        base_url = args.server_url.rstrip("/")
        args.server_overhead_ms = server_overhead_ms(base_url, latency_s)
        yield base_url
        return
    with demo_server_process(latency_s) as base_url:
        args.server_overhead_ms = server_overhead_ms(base_url, latency_s)
        yield base_url


def server_overhead_ms(base_url: str, latency_s: float, requests: int = 20) -> float:
    """Median milliseconds per sequential chat request beyond the injected latency."""
    body = {"model": DEMO_MODELS[0], "messages": [{"role": "user", "content": "Hello."}], "seed": 1}
    timings = []
    with httpx.Client(timeout=30.0) as client:
        for _ in range(requests):
            started = time.perf_counter()
            client.post(f"{base_url}/chat/completions", json=body).raise_for_status()
            timings.append(time.perf_counter() - started - latency_s)
    overhead_ms = statistics.median(timings) * 1000
    print(f"Demo server at {base_url}: {overhead_ms:.2f} ms per request beyond the {latency_s:g} s latency.", flush=True)
    if overhead_ms > 20:
        # 40 ms is the delayed-ACK stall of a server that writes headers and body in two
        # small packets without TCP_NODELAY; every turn would then wait that long.
        print("WARNING: the demo server adds more than 20 ms per request, so results measure the server, not hermitkit.", flush=True)
    return overhead_ms


def add_database_arguments(parser: argparse.ArgumentParser, *, default: str = "sqlite") -> None:
    parser.add_argument(
        "--database",
        default=default,
        help="Comma-separated list of 'sqlite' and 'postgresql' (a fresh database each), "
        f"or one SQLAlchemy URL. Default: {default}.",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES_URL),
        help=f"Server URL used to create throwaway PostgreSQL databases (default: ${POSTGRES_ENV} or {DEFAULT_POSTGRES_URL}).",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hermitkit-bench", help="Folder for SQLite files (default: %(default)s).")


def database_kinds(value: str) -> list[str]:
    """Split ``--database`` into 'sqlite', 'postgresql' or URL entries."""
    if "://" in value:
        return [value]
    kinds = [item.strip() for item in value.split(",") if item.strip()]
    for kind in kinds:
        if kind not in ("sqlite", "postgresql"):
            raise SystemExit(f"--database {value!r} is invalid: use sqlite, postgresql, both separated by a comma, or a SQLAlchemy URL.")
    return kinds


def kind_of_url(url: str) -> str:
    if url.startswith("postgres"):
        return "postgresql"
    return url.split(":", 1)[0].split("+", 1)[0]


@contextlib.contextmanager
def fresh_database(kind: str, args: argparse.Namespace, *, keep: bool = False) -> Iterator[str]:
    """Yield the URL of a new, empty database of ``kind``; drop it afterwards unless ``keep``."""
    if "://" in kind:
        yield kind
        return

    if kind == "sqlite":
        args.workdir.mkdir(parents=True, exist_ok=True)
        path = args.workdir / f"bench-{uuid.uuid4().hex[:10]}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            if not keep:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        return

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from hermitkit.store import normalize_database_url

    base = normalize_database_url(args.postgres_url)
    name = f"hermitkit_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        if not keep:
            with admin.connect() as connection:
                connection.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"))
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def machine_info(postgres_url: str | None = None) -> dict[str, Any]:
    """Return the CPU model, cores, RAM and software versions of this machine."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)

    import pandas
    import sqlalchemy

    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "httpx": httpx.__version__,
        "pandas": pandas.__version__,
    }
    if postgres_url:
        info["postgresql"] = postgres_version(postgres_url)
    return info


def postgres_version(url: str) -> str | None:
    from sqlalchemy import create_engine, text

    from hermitkit.store import normalize_database_url

    try:
        engine = create_engine(normalize_database_url(url))
        with engine.connect() as connection:
            version = connection.execute(text("SHOW server_version")).scalar()
        engine.dispose()
        return str(version)
    except Exception:  # noqa: BLE001 - a missing server only leaves the version blank
        return None


def emit(results: list[dict[str, Any]], json_path: Path | None) -> None:
    """Append ``results`` as JSON lines to ``json_path`` when one was given."""
    if json_path is None:
        return
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with json_path.open("a", encoding="utf-8") as handle:
        for row in results:
            handle.write(json.dumps(row, default=str) + "\n")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as a Markdown table, so output can be pasted into the README."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |")
    sys.stdout.flush()
