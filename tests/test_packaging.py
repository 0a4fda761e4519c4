"""pyproject.toml and environment.yml must install the same dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# conda-forge names that differ from the PyPI name.
CONDA_NAMES = {"psycopg[binary]": "psycopg", "sqlalchemy": "sqlalchemy", "pyyaml": "pyyaml"}


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].lower()
    return CONDA_NAMES.get(name, name)


def test_conda_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(item) for item in project["dependencies"] + project["optional-dependencies"]["test"]}
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = {_name(item) for item in environment["dependencies"] if isinstance(item, str)} - {"python", "pip"}
    assert wanted == listed
