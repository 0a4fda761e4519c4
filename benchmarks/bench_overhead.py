"""Overhead per turn: hermitkit's turn loop against bare request loops that store nothing.

All loops run in this process against the same demo server (a separate process, no
added latency) and send the same request bodies. The bare loop replays the requests
that hermitkit's batch sent, rebuilt from the stored transcripts before timing starts.

- hermitkit: ``run_batch_async`` without judging, timed from its ``batch_started``
  event to its last ``run_finished`` event. Each turn is a chat request, the verdict
  and a committed exchange (assistant turn, echo and run counters).
- bare: C asyncio workers, each with its own ``httpx.AsyncClient``, that post each
  body and decode the JSON reply. Nothing is stored.
- bare_transport: the same loop sent through hermitkit's own HTTP path
  (``hermitkit.http_pool.PooledTransport`` called directly, without
  ``httpx.AsyncClient``). Its time shows what hermitkit's turn loop adds on top of
  the requests alone.

The ratio is hermitkit's time per turn divided by the bare loop's (target <= 1.5);
``ratio_transport`` divides by the bare_transport loop's.
Each setting runs ``--repeat`` times, alternating the two loops; the table shows
medians.

    python benchmarks/bench_overhead.py --runs 64 --turns 10 --concurrency 1,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from _common import DEMO_MODELS, JUDGE_MODEL, add_database_arguments, add_server_argument, database_kinds, demo_server, emit, fresh_database, kind_of_url, machine_info, print_table
from sqlalchemy import select

from hermitkit.client import build_chat_payload
from hermitkit.config import build_config
from hermitkit.http_pool import PooledTransport
from hermitkit.runner import run_batch_async
from hermitkit.store import Run, Store, Turn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=64, help="Runs per batch (default: %(default)s).")
    parser.add_argument("--turns", type=int, default=10, help="Assistant turns per run (default: %(default)s).")
    parser.add_argument("--concurrency", default="1,64", help="Comma-separated concurrency values to measure (default: %(default)s).")
    parser.add_argument("--latency", type=float, default=0.0, help="Seconds the demo server waits before each reply (default: %(default)s).")
    parser.add_argument("--repeat", type=int, default=3, help="Measurements of each loop per setting (default: %(default)s).")
    parser.add_argument("--json", type=Path, default=None, help="Append results as JSON lines to this file.")
    add_server_argument(parser)
    add_database_arguments(parser, default="sqlite")
    return parser.parse_args()


async def hermitkit_loop(args: argparse.Namespace, base_url: str, store: Store, concurrency: int) -> tuple[float, int]:
    """Run one unjudged batch; return the seconds from start to the last finished run, and its id."""
    config = build_config(
        {
            "name": "bench-overhead",
            "endpoint": {"base_url": base_url},
            "models": [DEMO_MODELS[0]],
            "runs": args.runs,
            "turns": args.turns,
            "judges": [JUDGE_MODEL],
            "seed": 1,
            "concurrency": concurrency,
        }
    ).model_copy(update={"judges": []})

    marks: dict[str, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        marks[event["event"]] = time.perf_counter()

    outcome = await run_batch_async(config, store=store, progress=False, on_event=on_event)
    if outcome.status != "completed":
        raise RuntimeError(f"Batch {outcome.batch_id} ended as {outcome.status}: {outcome.message}")
    return marks["run_finished"] - marks["batch_started"], outcome.batch_id


def stored_requests(store: Store, batch_id: int) -> list[list[dict[str, Any]]]:
    """Rebuild, from the stored turns, the request bodies that each run of ``batch_id`` sent."""

    def read(session: Any) -> list[list[dict[str, Any]]]:
        runs = session.execute(select(Run.id, Run.model, Run.params).where(Run.batch_id == batch_id).order_by(Run.id)).all()
        bodies = []
        for run_id, model, params in runs:
            turns = session.execute(select(Turn.role, Turn.content).where(Turn.run_id == run_id).order_by(Turn.idx)).all()
            messages = [{"role": role, "content": content or ""} for role, content in turns]
            sampling = {key: value for key, value in params.items() if key in ("temperature", "top_p", "max_tokens", "seed", "reasoning")}
            # The request for assistant turn k carries the 2k - 1 messages before it.
            bodies.append([build_chat_payload(model, messages[:position], **sampling) for position in range(1, len(messages), 2)])
        return bodies

    return store.read(read)


async def bare_loop(base_url: str, runs: list[list[dict[str, Any]]], concurrency: int) -> float:
    """Post every body, one run after another per worker; return the seconds taken."""
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for bodies in runs:
        queue.put_nowait(bodies)
    url = f"{base_url}/chat/completions"
    clients = [httpx.AsyncClient(timeout=60.0) for _ in range(min(concurrency, len(runs)))]

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            for body in queue.get_nowait():
                response = await client.post(url, json=body)
                response.raise_for_status()
                response.json()["choices"][0]["message"]

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in clients))
        return time.perf_counter() - started
    finally:
        for client in clients:
            await client.aclose()


async def bare_transport_loop(base_url: str, runs: list[list[dict[str, Any]]], concurrency: int) -> float:
    """Post every body through one PooledTransport, as hermitkit's client does, and return the seconds taken."""
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for bodies in runs:
        queue.put_nowait(bodies)
    url = httpx.URL(f"{base_url}/chat/completions")
    transport = PooledTransport(max_connections=max(concurrency * 2, 8))
    timeouts = {"connect": 60.0, "read": 60.0, "write": 60.0, "pool": None}

    async def worker() -> None:
        while not queue.empty():
            for body in queue.get_nowait():
                content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
                request = httpx.Request("POST", url, headers={"Content-Type": "application/json"}, content=content, extensions={"timeout": timeouts})
                response = await transport.handle_async_request(request)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                if response.status_code != 200:
                    raise RuntimeError(f"The demo server replied {response.status_code}.")
                response.json()["choices"][0]["message"]

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(runs)))))
        return time.perf_counter() - started
    finally:
        await transport.aclose()


def measure(args: argparse.Namespace, base_url: str, url: str, concurrency: int) -> dict[str, Any]:
    turns = args.runs * args.turns
    hermitkit_times, bare_times, transport_times = [], [], []
    store = Store(url)
    try:
        _, batch_id = asyncio.run(hermitkit_loop(args, base_url, store, concurrency))
        requests = stored_requests(store, batch_id)
        for _ in range(args.repeat):
            bare_times.append(asyncio.run(bare_loop(base_url, requests, concurrency)))
            transport_times.append(asyncio.run(bare_transport_loop(base_url, requests, concurrency)))
            hermitkit_times.append(asyncio.run(hermitkit_loop(args, base_url, store, concurrency))[0])
    finally:
        store.dispose()

    hermitkit_ms = statistics.median(hermitkit_times) / turns * 1000
    bare_ms = statistics.median(bare_times) / turns * 1000
    transport_ms = statistics.median(transport_times) / turns * 1000
    return {
        "benchmark": "overhead",
        "database": kind_of_url(url),
        "latency_s": args.latency,
        "concurrency": concurrency,
        "runs": args.runs,
        "turns": args.turns,
        "hermitkit_ms_per_turn": hermitkit_ms,
        "bare_ms_per_turn": bare_ms,
        "ratio": hermitkit_ms / bare_ms,
        "bare_transport_ms_per_turn": transport_ms,
        "ratio_transport": hermitkit_ms / transport_ms,
        "hermitkit_s": hermitkit_times,
        "bare_s": bare_times,
        "bare_transport_s": transport_times,
    }


def main() -> None:
    args = parse_args()
    concurrencies = [int(value) for value in args.concurrency.split(",") if value.strip()]
    kinds = database_kinds(args.database)
    results = []

    with demo_server(args, args.latency) as base_url:
        for kind in kinds:
            for concurrency in concurrencies:
                with fresh_database(kind, args) as url:
                    results.append(measure(args, base_url, url, concurrency))

    machine = machine_info(args.postgres_url if "postgresql" in kinds else None)
    for row in results:
        row["machine"] = machine
        row["server_overhead_ms"] = args.server_overhead_ms
    print_table(results, ["database", "latency_s", "concurrency", "runs", "turns", "hermitkit_ms_per_turn", "bare_ms_per_turn", "ratio", "bare_transport_ms_per_turn", "ratio_transport"])
    emit(results, args.json)


if __name__ == "__main__":
    main()
