"""Batch configs and params files: every bad value is named with its fix."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hermitkit.config import BatchConfig, apply_overrides, build_config, load_params
from hermitkit.errors import ConfigError

VALID = {"models": ["demo/steady"], "runs": 2, "turns": 3, "judges": ["demo/judge"], "endpoint": "demo"}


def _bad(**changes):
    data = {**VALID, **changes}
    return {key: value for key, value in data.items() if value is not ...}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_bad(turns=0), "turns = 0"),
        (_bad(runs=-1), "runs = -1"),
        (_bad(runs=0), "runs = 0"),
        (_bad(temperature=3), "temperature = 3"),
        (_bad(temperature=-0.1), "temperature = -0.1"),
        (_bad(top_p=0), "top_p = 0"),
        (_bad(top_p=1.5), "top_p = 1.5"),
        (_bad(models="demo/steady"), "models = 'demo/steady'"),
        (_bad(models=[]), "models = []"),
        (_bad(models=["a", "a"]), "listed twice"),
        (_bad(models=[" a"]), "leading or trailing spaces"),
        (_bad(runs="3"), "runs = '3'"),
        (_bad(runs=2.5), "runs = 2.5"),
        (_bad(runs=True), "runs = True"),
        (_bad(judges=...), "judges is missing"),
        (_bad(protocol="nope"), "Unknown protocol 'nope'"),
        (_bad(temprature=0.5), "did you mean 'temperature'"),
        (_bad(concurency=4), "did you mean 'concurrency'"),
        (_bad(endpoint={"base_url": "demo", "api_key": "sk-x"}), "did you mean 'api_key_env'"),
        (_bad(endpoint={"base_url": "ftp://x"}), "must start with http"),
        (_bad(budget_usd=0), "budget_usd = 0"),
        (_bad(concurrency=0), "concurrency = 0"),
    ],
)
def test_bad_config_names_value(data, expected):
    with pytest.raises(ConfigError) as info:
        build_config(data)
    assert expected in str(info.value)


def test_single_judge_key_accepted():
    config = build_config({**{k: v for k, v in VALID.items() if k != "judges"}, "judge": "demo/judge"})
    assert config.judges == ["demo/judge"]


def test_endpoint_string_means_base_url():
    config = build_config(VALID)
    assert config.endpoint.is_demo


def test_key_never_in_config_dump():
    config = build_config({**VALID, "endpoint": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_KEY"}})
    assert config.model_dump()["endpoint"]["api_key_env"] == "MY_KEY"


def test_key_like_env_name_rejected():
    with pytest.raises(ConfigError, match="NAME of an environment variable"):
        build_config({**VALID, "endpoint": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "sk-or-v1-abc"}})


def test_overrides_are_yaml_typed():
    merged = apply_overrides(dict(VALID), ["runs=5", "temperature=0.5", "endpoint.timeout_s=3", "models=[a, b]"])
    assert merged["runs"] == 5
    assert merged["temperature"] == 0.5
    assert merged["endpoint"] == {"base_url": "demo", "timeout_s": 3}
    assert merged["models"] == ["a", "b"]


@pytest.mark.parametrize("override", ["runs", "=3", "runs=[unclosed"])
def test_bad_override_rejected(override):
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides(dict(VALID), [override])


def test_params_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(VALID))
    config = load_params(path, ["turns=4"])
    assert config.turns == 4


@pytest.mark.parametrize(("text", "expected"), [("- a\n- b\n", "must contain a mapping"), ("runs: [\n", "not valid YAML"), ("", "models is missing")])
def test_bad_params_file(tmp_path, text, expected):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_demo_params_file_is_valid():
    config = load_params("params/demo.yaml")
    assert len(config.models) >= 4
    assert config.runs >= 3
    assert config.turns >= 10
    assert config.endpoint.is_demo


scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-3, 3, allow_nan=False), st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from([*BatchConfig.model_fields, "judge", "bogus"]), scalar, max_size=8))
def test_loader_raises_only_config_error(data):
    try:
        config = build_config(data)
    except ConfigError as exc:
        assert str(exc).startswith("Invalid batch config")
    else:
        assert config.runs >= 1
        assert config.turns >= 1
        assert config.models


def test_protocol_path_relative_to_params(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "variant.yaml").write_text("id: variant\ninitial_prompt: 'Say {x}'\nwarning: w\n")
    (folder / "p.yaml").write_text(yaml.safe_dump({**VALID, "protocol": "variant.yaml"}))
    monkeypatch.chdir(tmp_path)
    config = load_params(folder / "p.yaml")
    assert config.load_protocol().id == "variant"


def test_override_named_in_error_source(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(VALID))
    with pytest.raises(ConfigError, match="with --set turns=0"):
        load_params(path, ["turns=0"])
