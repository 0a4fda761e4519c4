"""Bad params files, ``--set`` values and protocol files: rejected by name before any request.

The CLI cases run in-process with click's test runner against a live demo server,
which must see no request at all, and the store must hold no batch afterwards. The
property tests feed random data to the config and protocol loaders, which may only
return a value or raise ConfigError.
"""

from __future__ import annotations

import difflib
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from hermitkit.cli import cli
from hermitkit.config import BatchConfig, EndpointConfig, apply_overrides, build_config, load_params, parse_override
from hermitkit.demo import DemoServer
from hermitkit.errors import ConfigError
from hermitkit.protocol import Protocol, load_protocol, protocol_from_yaml
from hermitkit.runner import run_batch
from hermitkit.store import Batch, Store

VALID_PROTOCOL = {"id": "custom", "initial_prompt": "You are free. Write {in braces}.", "warning": "Use {braces}."}


def _params(base_url: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "endpoint": {"base_url": base_url, "backoff_base_s": 0.001},
        "models": ["demo/steady"],
        "runs": 1,
        "turns": 2,
        "judges": ["demo/judge"],
    }
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def _protocol_file(folder: Path, name: str, content: Any) -> str:
    path = folder / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
    return str(path)


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    with DemoServer() as running:
        yield running


# (changes to the params file, text the error must contain)
BAD_PARAMS: list[tuple[dict[str, Any], str]] = [
    ({"runs": "three"}, "runs = 'three'"),
    ({"runs": 2.5}, "runs = 2.5"),
    ({"runs": 0}, "runs = 0"),
    ({"runs": -3}, "runs = -3"),
    ({"turns": 0}, "turns = 0"),
    ({"turns": -1}, "turns = -1"),
    ({"concurrency": 0}, "concurrency = 0"),
    ({"per_model_concurrency": 0}, "per_model_concurrency = 0"),
    ({"max_tokens": 0}, "max_tokens = 0"),
    ({"judge_max_tokens": 10}, "judge_max_tokens = 10"),
    ({"budget_usd": -1}, "budget_usd = -1"),
    ({"temperature": "hot"}, "temperature = 'hot'"),
    ({"models": "demo/steady"}, "models = 'demo/steady'"),
    ({"models": []}, "models = []"),
    ({"models": ...}, "models is missing"),
    ({"judges": []}, "judges = []"),
    ({"judges": "demo/judge"}, "judges = 'demo/judge'"),
    ({"modles": ["demo/steady"]}, "unknown key 'modles': did you mean 'models'?"),
    ({"judge_temprature": 0}, "did you mean 'judge_temperature'?"),
    ({"protocol": "hermitkit-v9"}, "Unknown protocol 'hermitkit-v9'"),
    ({"protocol": 3}, "protocol = 3"),
    ({"seed": "random"}, "seed = 'random'"),
]

BAD_SETS: list[tuple[str, str]] = [
    ("runs=abc", "runs = 'abc'"),
    ("runs=0", "runs = 0"),
    ("turns=-5", "turns = -5"),
    ("models=demo/steady", "models = 'demo/steady'"),
    ("models=[]", "models = []"),
    ("runz=3", "unknown key 'runz': did you mean 'runs'?"),
    ("endpoint.timout_s=3", "unknown key 'endpoint.timout_s': did you mean 'timeout_s'?"),
    ("endpoint.max_retries=-1", "endpoint.max_retries = -1"),
    ("endpoint.timeout_s=0", "endpoint.timeout_s = 0"),
    ("endpoint.max_connections=0", "endpoint.max_connections = 0"),
    ("models=[demo/steady", "not valid YAML"),
    ("protocol=nope", "Unknown protocol 'nope'"),
    ("concurrency=1.5", "concurrency = 1.5"),
    ("runs", "write it as key=value"),
]

# (protocol file content, text the error must contain)
BAD_PROTOCOLS: list[tuple[Any, str]] = [
    ({"id": "x", "initial_prompt": "Go."}, "missing required key 'warning'"),
    ({"id": "x", "warning": "W"}, "missing required key 'initial_prompt'"),
    ({**VALID_PROTOCOL, "initial_prompt": ["not", "text"]}, "initial_prompt must be a non-empty string; got ['not', 'text']"),
    ({**VALID_PROTOCOL, "initial_prompt": 42}, "initial_prompt must be a non-empty string; got 42"),
    ({**VALID_PROTOCOL, "warning": "   "}, "warning must be a non-empty string"),
    ({**VALID_PROTOCOL, "extraction": "middle"}, "extraction 'middle' is invalid"),
    ({**VALID_PROTOCOL, "history": "window"}, "needs window set"),
    ({**VALID_PROTOCOL, "window": 3}, "window is set to 3"),
    ({**VALID_PROTOCOL, "prompt": "typo"}, "unknown key(s) 'prompt'"),
    ({**VALID_PROTOCOL, "warnings": "typo"}, "Did you mean 'warning'?"),
    ({1: "a", "id": "x"}, "unknown key(s) 1"),
    ("[just, a, list]", "must be a mapping"),
    ("id: [unclosed", "is not valid YAML"),
]


def _assert_nothing_sent(server: DemoServer, database: Path) -> None:
    stats = server.stats()
    assert stats["chat_requests_total"] == 0
    assert stats["model_list_requests"] == 0
    if database.exists():
        store = Store(f"sqlite:///{database}")
        assert store.read(lambda session: session.scalar(select(func.count()).select_from(Batch))) == 0


def _invoke(tmp_path: Path, data: dict[str, Any], *overrides: str) -> Any:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data), encoding="utf-8")
    database = tmp_path / "input.db"
    args = ["run", str(params), "--no-progress", "--database-url", f"sqlite:///{database}"]
    for override in overrides:
        args += ["--set", override]
    return CliRunner().invoke(cli, args), database


@pytest.mark.parametrize(("changes", "expected"), BAD_PARAMS, ids=[expected for _, expected in BAD_PARAMS])
def test_bad_params_rejected_before_sending(changes, expected, server, tmp_path):
    result, database = _invoke(tmp_path, _params(server.base_url, **changes))
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert "params.yaml" in result.stderr
    _assert_nothing_sent(server, database)


@pytest.mark.parametrize(("override", "expected"), BAD_SETS, ids=[override for override, _ in BAD_SETS])
def test_bad_set_values_rejected_before_sending(override, expected, server, tmp_path):
    result, database = _invoke(tmp_path, _params(server.base_url), override)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    _assert_nothing_sent(server, database)


@pytest.mark.parametrize(("content", "expected"), BAD_PROTOCOLS, ids=[expected for _, expected in BAD_PROTOCOLS])
def test_bad_protocol_files_rejected_before_sending(content, expected, server, tmp_path):
    path = _protocol_file(tmp_path, "protocol.yaml", content)
    result, database = _invoke(tmp_path, _params(server.base_url, protocol=path))
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert "protocol.yaml" in result.stderr
    _assert_nothing_sent(server, database)


def test_library_rejects_bad_config_before_sending(server, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'library.db'}")
    for changes, expected in BAD_PARAMS:
        with pytest.raises(ConfigError) as info:
            run_batch(_params(server.base_url, **changes), store=store, progress=False)
        assert expected in str(info.value)
    _assert_nothing_sent(server, tmp_path / "library.db")


def test_unknown_model_rejected_after_model_list_only(server, tmp_path):
    result, database = _invoke(tmp_path, _params(server.base_url, models=["demo/stedy"]))
    assert result.exit_code == 2
    assert "'demo/stedy'" in result.stderr
    assert "demo/steady" in result.stderr
    assert server.stats()["chat_requests_total"] == 0


def test_valid_protocol_file_accepted(server, tmp_path):
    path = _protocol_file(tmp_path, "protocol.yaml", VALID_PROTOCOL)
    result, _ = _invoke(tmp_path, _params(server.base_url, protocol=path))
    assert result.exit_code == 0, result.output
    assert server.stats()["chat_requests"]["demo/steady"] == 2


# ---------------------------------------------------------------- property-based tests

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(-2, 3, allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)), max_leaves=8)
yaml_keys = st.one_of(st.text(max_size=12), st.integers(-2, 2), st.booleans(), st.none())

PROTOCOL_KEYS = ["id", "initial_prompt", "warning", "extraction", "history", "window"]
protocol_values = st.one_of(json_values, st.sampled_from(["first", "span", "last", "full", "window", "Go {on}.", ""]), st.integers(0, 5))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(PROTOCOL_KEYS), yaml_keys), protocol_values, max_size=7))
def test_protocol_loader_returns_or_raises_config_error(data):
    text = yaml.safe_dump(data)
    try:
        protocol = protocol_from_yaml(text, source="generated")
    except ConfigError as exc:
        assert str(exc).startswith("generated")
    else:
        assert isinstance(protocol, Protocol)
        assert protocol.initial_prompt == data["initial_prompt"]
        assert protocol.warning == data["warning"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_protocol_loader_survives_any_text(text):
    try:
        protocol_from_yaml(text, source="generated")
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.one_of(st.sampled_from([*BatchConfig.model_fields, "judge"]), yaml_keys), json_values, max_size=8))
def test_params_loader_returns_or_raises_config_error(tmp_path, data):
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        config = load_params(path)
    except ConfigError as exc:
        assert "generated.yaml" in str(exc)
    else:
        assert config.models
        assert config.runs >= 1
        assert config.turns >= 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_overrides_return_or_raise_config_error(overrides):
    base = {"models": ["demo/steady"], "runs": 1, "turns": 1, "judges": ["demo/judge"], "endpoint": "demo"}
    try:
        merged = apply_overrides(base, overrides)
        build_config(merged, source="--set")
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(set(BatchConfig.model_fields) | {f"endpoint.{name}" for name in EndpointConfig.model_fields})), st.data())
def test_misspelt_key_names_closest_valid_key(key, data):
    """Dropping or doubling one letter of a valid key gives a rejection that suggests the key."""
    *parents, name = key.split(".")
    if len(name) < 5:
        return
    position = data.draw(st.integers(0, len(name) - 1))
    typo = data.draw(st.sampled_from([name[:position] + name[position + 1 :], name[:position] + name[position] + name[position:]]))
    owner = EndpointConfig if parents else BatchConfig
    known = [*owner.model_fields, "judge"]
    if typo in known or difflib.get_close_matches(typo, known, n=1) != [name]:
        return

    with pytest.raises(ConfigError) as info:
        build_config(apply_overrides({"models": ["m"], "runs": 1, "turns": 1, "judges": ["j"]}, [".".join([*parents, typo]) + "=1"]))
    assert f"did you mean {name!r}?" in str(info.value)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["runs", "turns", "concurrency"]), st.integers(-1000, 0))
def test_non_positive_counts_rejected(key, value):
    with pytest.raises(ConfigError, match=f"{key} = {value}"):
        build_config({"models": ["m"], "runs": 1, "turns": 1, "judges": ["j"], key: value})


def test_parse_override_reads_yaml_types():
    assert parse_override("runs=3") == (["runs"], 3)
    assert parse_override("models=[a, b]") == (["models"], ["a", "b"])
    assert parse_override("endpoint.timeout_s=2.5") == (["endpoint", "timeout_s"], 2.5)


def test_builtin_protocol_loads():
    assert load_protocol().id == "hermitkit-v1"


# ---------------------------------------------------------------- database URLs and ports


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgress://postgres@127.0.0.1/x", "Unsupported database 'postgress'"),
        ("mysql://user:secret@127.0.0.1/x", "Unsupported database 'mysql' in mysql://user:***@127.0.0.1/x"),
        ("user:secret@127.0.0.1:5432/x", "Invalid database URL '***@127.0.0.1:5432/x'"),
        ("postgresql+psycopg2://postgres@127.0.0.1/x", "The database driver of postgresql+psycopg2://postgres@127.0.0.1/x is not available"),
    ],
)
def test_bad_database_url_named_without_traceback(url, expected):
    result = CliRunner().invoke(cli, ["status", "--database-url", url])

    assert result.exit_code == 2
    assert expected in result.output
    assert "sqlite:///PATH" in result.output
    assert "secret" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "1"],
        ["show", "1"],
        ["resume", "1"],
        ["export", "1", "--format", "csv", "--out", "OUT"],
        ["report", "1", "--format", "csv"],
        ["judge", "1", "--judge", "demo/judge"],
    ],
)
def test_missing_sqlite_store_named_not_created(args, tmp_path):
    missing = tmp_path / "typo" / "hermitkit.db"
    args = [str(tmp_path / "out") if arg == "OUT" else arg for arg in args]

    result = CliRunner().invoke(cli, [*args, "--database-url", f"sqlite:///{missing}"])

    assert result.exit_code == 2, result.output
    assert f"No hermitkit store at {missing}: the file does not exist" in result.output
    assert not (tmp_path / "typo").exists()


def test_run_creates_missing_sqlite_store(server, tmp_path):
    store_path = tmp_path / "new" / "hermitkit.db"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"endpoint": {"base_url": server.base_url}, "models": ["demo/steady"], "runs": 1, "turns": 1, "judges": ["demo/judge"]}))

    result = CliRunner().invoke(cli, ["run", str(params), "--no-progress", "--database-url", f"sqlite:///{store_path}"])

    assert result.exit_code == 0, result.output
    assert store_path.exists()


def test_demo_server_port_in_use_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = CliRunner().invoke(cli, ["demo-server", "--port", str(port)])

    assert result.exit_code == 1
    assert f"Could not listen on 127.0.0.1:{port}" in result.output
    assert "--port" in result.output
