"""hermitkit: run and judge the HermitBench autonomy experiment.

``import hermitkit as hk`` is cheap: the public names below are imported on first use,
because pandas, SQLAlchemy and ipywidgets take a while to load in a notebook.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "BatchConfig": "hermitkit.config",
    "build_config": "hermitkit.config",
    "load_params": "hermitkit.config",
    "load_protocol": "hermitkit.protocol",
    "classify": "hermitkit.protocol",
    "Store": "hermitkit.store",
    "run_batch": "hermitkit.runner",
    "run_batch_async": "hermitkit.runner",
    "resume_batch": "hermitkit.runner",
    "resume_batch_async": "hermitkit.runner",
    "DemoServer": "hermitkit.demo",
    "summary": "hermitkit.analysis",
    "app": "hermitkit.widgets",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'hermitkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
