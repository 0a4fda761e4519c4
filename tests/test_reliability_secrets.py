"""Canary keys set in the environment must not appear anywhere a test can look.

Places checked: every database row and the SQLite files, log records at DEBUG level
(httpx and httpcore included) and the CLI's ``-vv`` stderr, exception texts, CSV files
and the Markdown scorecard. A server that echoes the Authorization header back in its
error bodies checks that provider text is redacted before it reaches a message. The
executed notebooks and HTML pages are checked by the notebook tests.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hermitkit.client import OpenAICompatibleClient
from hermitkit.demo import DemoServer, FaultRule
from hermitkit.errors import AuthenticationError, ConfigError, ProviderError
from hermitkit.export import export_batch
from hermitkit.reports import scorecard_markdown, write_report
from hermitkit.runner import resume_batch, run_batch
from hermitkit.store import Base, Store
from tests.reliability_support import JUDGE, cli_env, demo_config, fast_endpoint, hermitkit_cli, write_params

CANARY_OPENROUTER = "sk-or-v1-CANARY0openrouter0c0ffee0123456789abcdef"
CANARY_ENDPOINT = "sk-CANARY1endpoint1feedface9876543210"
CANARIES = (CANARY_OPENROUTER, CANARY_ENDPOINT)
KEY_ENV = "MY_ENDPOINT_KEY"

FAULTS = [
    FaultRule("500", model="demo/steady", every=2),
    FaultRule("429", model="demo/steady", every=3, retry_after=0),
    FaultRule("error200", model="demo/wanderer", every=2),
    FaultRule("reset", model="demo/wanderer", every=5),
    FaultRule("403", model="demo/forgetful", every=2, first=2),
    FaultRule("judge_out_of_range", model=JUDGE, first=2),
]


@pytest.fixture
def canary_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", CANARY_OPENROUTER)
    monkeypatch.setenv(KEY_ENV, CANARY_ENDPOINT)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every logger at DEBUG, httpx and httpcore included, which hermitkit keeps at WARNING."""
    levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    try:
        yield caplog
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def assert_no_canary(text: str | bytes, where: str) -> None:
    for canary in CANARIES:
        needle = canary.encode() if isinstance(text, bytes) else canary
        assert needle not in text, f"key found in {where}"


def assert_authorization_masked(text: str, where: str) -> None:
    for line in text.splitlines():
        if "authorization" in line.lower():
            assert "[redacted]" in line, f"unmasked Authorization in {where}: {line[:200]}"


def _database_dump(store: Store) -> str:
    def read(session):  # type: ignore[no-untyped-def]
        lines = []
        for table in Base.metadata.sorted_tables:
            for row in session.execute(select(table)).mappings():
                lines.append(json.dumps({key: str(value) for key, value in row.items()}))
        return "\n".join(lines)

    return store.read(read)


def test_canary_keys_leak_nowhere(canary_env, debug_logs, tmp_path):
    database = tmp_path / "canary.db"
    store = Store(f"sqlite:///{database}")
    errors: list[BaseException] = []

    with DemoServer(require_key=CANARY_ENDPOINT, faults=FAULTS) as server:
        endpoint = fast_endpoint(server.base_url, api_key_env=KEY_ENV, max_retries=8)
        config = demo_config(server.base_url, models=["demo/steady", "demo/wanderer", "demo/forgetful"], runs=2, turns=3, concurrency=3, endpoint=endpoint)
        outcome = run_batch(config, store=store, progress=False)
        assert outcome.status == "failed"
        assert outcome.message
        resumed = resume_batch(outcome.batch_id, store=store, progress=False)
        assert resumed.status == "completed", resumed.message

        # an endpoint that rejects the key: the exception and the stored error
        with DemoServer(require_key="another-key") as rejecting:
            bad = demo_config(rejecting.base_url, endpoint=fast_endpoint(rejecting.base_url, api_key_env=KEY_ENV))
            with pytest.raises(AuthenticationError) as info:
                run_batch(bad, store=store, progress=False)
            errors.append(info.value)

        # the custom endpoint only ever received its own key
        received = server.received_authorization
        assert received
        assert set(received) == {f"Bearer {CANARY_ENDPOINT}"}

    # the debug log really contains request lines, with the header masked
    assert "authorization" in debug_logs.text.lower()
    assert_authorization_masked(debug_logs.text, "log records")
    assert_no_canary(debug_logs.text, "log records")
    for record in debug_logs.records:
        assert_no_canary(record.getMessage(), f"log record of {record.name}")
    for error in errors:
        assert_no_canary(str(error), "exception text")
        assert_no_canary(repr(error), "exception repr")
    assert_no_canary(outcome.message, "batch outcome message")

    # the database rows and the files behind them
    assert_no_canary(_database_dump(store), "database rows")
    for path in tmp_path.glob("canary.db*"):
        assert_no_canary(path.read_bytes(), path.name)

    # exported and reported files
    written = export_batch(store, outcome.batch_id, tmp_path / "export", "csv")
    written += write_report(store, outcome.batch_id, tmp_path / "report", formats=("csv", "scorecard"))
    assert any(path.suffix == ".md" for path in written)
    for path in written:
        assert_no_canary(path.read_bytes(), path.name)
    assert_no_canary(scorecard_markdown(store, outcome.batch_id), "scorecard")


def test_custom_endpoint_never_gets_openrouter_key(canary_env, monkeypatch, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'custom.db'}")
    monkeypatch.delenv(KEY_ENV)
    with DemoServer() as server:
        # no key variable named: the request goes out without any Authorization header
        outcome = run_batch(demo_config(server.base_url), store=store, progress=False)
        assert outcome.status == "completed"
        assert server.received_authorization == []

        # naming OPENROUTER_API_KEY for another host is rejected before any request
        endpoint = fast_endpoint(server.base_url, api_key_env="OPENROUTER_API_KEY")
        with pytest.raises(ConfigError) as info:
            run_batch(demo_config(server.base_url, endpoint=endpoint), store=store, progress=False)
        assert "only sent to openrouter.ai" in str(info.value)
        assert_no_canary(str(info.value), "exception text")
        assert server.stats()["model_list_requests"] == 1
        assert server.received_authorization == []


@pytest.mark.parametrize(
    "base_url",
    ["https://openrouter.ai.example.invalid/api/v1", "http://127.0.0.1:9/openrouter.ai/api/v1", "http://openrouter.ai@127.0.0.1:9/v1", "http://127.0.0.1:9/v1?host=openrouter.ai"],
)
def test_lookalike_urls_do_not_get_openrouter_key(canary_env, monkeypatch, base_url):
    monkeypatch.delenv(KEY_ENV)
    client = OpenAICompatibleClient(base_url)
    assert not client.is_openrouter
    assert not client.has_api_key
    assert_no_canary(repr(client), "client repr")


class _EchoingHandler(BaseHTTPRequestHandler):
    """Replies with the status in the path and the request's Authorization header in the body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = int(self.path.strip("/").split("/")[0])
        echoed = f"Invalid credentials: {self.headers.get('Authorization')}"
        body: dict[str, Any] = {"error": {"code": status, "message": echoed, "metadata": {"raw": echoed}}}
        code = 200 if status == 299 else status
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def echoing_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 413, 500, 503, 299])
def test_echoed_key_is_redacted(status, canary_env, debug_logs, echoing_server):
    """Provider text that quotes the key back is redacted in exceptions and log lines."""
    import asyncio

    client = OpenAICompatibleClient(f"{echoing_server}/{status}/v1", api_key_env=KEY_ENV, max_retries=1, backoff_base_s=0.001, backoff_max_s=0.01)

    async def call() -> None:
        async with client:
            await client.chat("demo/steady", [{"role": "user", "content": "hi"}])

    with pytest.raises(ProviderError) as info:
        asyncio.run(call())
    assert "[redacted]" in str(info.value)
    assert_no_canary(str(info.value), "exception text")
    assert_no_canary(debug_logs.text, "log records")
    assert_authorization_masked(debug_logs.text, "log records")


@pytest.mark.slow
def test_cli_debug_output_has_no_key(tmp_path):
    """`hermitkit -vv` through a faulty batch, a report, status and show."""
    database = tmp_path / "cli.db"
    env = cli_env(f"sqlite:///{database}", OPENROUTER_API_KEY=CANARY_OPENROUTER, **{KEY_ENV: CANARY_ENDPOINT})
    with DemoServer(require_key=CANARY_ENDPOINT, faults=FAULTS[:4]) as server:
        config = demo_config(server.base_url, models=["demo/steady", "demo/wanderer"], turns=3, endpoint=fast_endpoint(server.base_url, api_key_env=KEY_ENV))
        params = write_params(tmp_path / "params.yaml", config)
        outputs = [hermitkit_cli("-vv", "run", str(params), "--no-progress", env=env)]
        assert outputs[0].returncode == 0, outputs[0].stderr[-3000:]
        outputs.append(hermitkit_cli("-vv", "report", "1", "--format", "csv", "--format", "scorecard", "--out", str(tmp_path / "report"), env=env))
        outputs.append(hermitkit_cli("-vv", "status", "1", env=env))
        outputs.append(hermitkit_cli("-vv", "show", "1", "--reasoning", env=env))
        assert set(server.received_authorization) == {f"Bearer {CANARY_ENDPOINT}"}

    assert "Sending POST" in outputs[0].stderr
    for result in outputs:
        assert result.returncode == 0, result.stderr[-3000:]
        assert_no_canary(result.stdout + result.stderr, f"output of {result.args[3:5]}")
        assert_authorization_masked(result.stderr, f"stderr of {result.args[3:5]}")
    files = [path for path in tmp_path.rglob("*") if path.is_file() and path.name != "params.yaml"]
    assert any(path.suffix == ".md" for path in files)
    for path in files:
        assert_no_canary(path.read_bytes(), str(path.relative_to(tmp_path)))


@pytest.mark.parametrize("key_field", ["api_key_env", "api_key"])
def test_key_pasted_into_params_is_not_echoed(key_field, tmp_path):
    """A key pasted where a variable name belongs is rejected without showing it."""
    params = tmp_path / "params.yaml"
    params.write_text(f"endpoint: {{base_url: 'http://127.0.0.1:9/v1', {key_field}: '{CANARY_ENDPOINT}'}}\nmodels: [m]\nruns: 1\nturns: 1\njudges: [j]\n", encoding="utf-8")
    database = tmp_path / "pasted.db"
    result = hermitkit_cli("run", str(params), env=cli_env(f"sqlite:///{database}"))
    assert result.returncode == 2
    assert "api_key_env" in result.stderr
    assert_no_canary(result.stdout + result.stderr, "CLI output")
    for path in tmp_path.glob("pasted.db*"):
        assert_no_canary(path.read_bytes(), path.name)
