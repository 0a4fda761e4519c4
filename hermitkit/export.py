"""Tables of a batch as pandas frames, and safe CSV and JSON files of them.

Model output is untrusted: a CSV cell that starts like a spreadsheet formula is
prefixed with an apostrophe so that Excel, LibreOffice and Google Sheets show it as
text instead of running it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import select

from hermitkit.store import Batch, Judgement, Run, Store, Turn

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

DEMO_NOTICE = "DEMO DATA: produced by hermitkit's scripted offline demo models; it describes no real model."


def neutralize_formula(value: Any) -> Any:
    """Prefix a text cell that a spreadsheet would run as a formula with ``'``."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _json_cell(value: Any) -> Any:
    # Lists and dicts (judge topics, evidence) become JSON text, which reads back with json.loads.
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def safe_csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of ``frame`` with list and dict cells as JSON and formula-like text neutralised.

    Text columns of every dtype are checked: object, pandas' string dtype (the default
    for text from pandas 3) and categories. The index and column names are checked too.
    """
    safe = frame.copy()
    for column in safe.columns:
        series = safe[column]
        if isinstance(series.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(series) or series.dtype == object:
            safe[column] = series.astype(object).map(_json_cell).map(neutralize_formula)
    safe.columns = [neutralize_formula(column) for column in safe.columns]
    if safe.index.dtype == object or pd.api.types.is_string_dtype(safe.index):
        safe.index = safe.index.map(neutralize_formula)
    return safe


def write_csv(frame: pd.DataFrame, path: Path, *, index: bool = False) -> Path:
    """Write ``frame`` as UTF-8 CSV after ``safe_csv_frame``; quoted cells keep newlines, commas and quotes."""
    safe_csv_frame(frame).to_csv(path, index=index, encoding="utf-8")
    return path


def runs_frame(store: Store, batch_id: int) -> pd.DataFrame:
    query = select(Run).where(Run.batch_id == batch_id).order_by(Run.id)
    return _frame(store, query, Run)


def turns_frame(store: Store, batch_id: int) -> pd.DataFrame:
    query = select(Turn).join(Run, Run.id == Turn.run_id).where(Run.batch_id == batch_id).order_by(Turn.run_id, Turn.idx)
    frame = _frame(store, query, Turn)
    if frame.empty:
        return frame
    models = runs_frame(store, batch_id).set_index("id")["model"]
    frame.insert(1, "model", frame["run_id"].map(models))
    return frame


def judgements_frame(store: Store, batch_id: int) -> pd.DataFrame:
    query = select(Judgement).join(Run, Run.id == Judgement.run_id).where(Run.batch_id == batch_id).order_by(Judgement.id)
    return _frame(store, query, Judgement)


def _frame(store: Store, query: Any, model: Any) -> pd.DataFrame:
    columns = [column.key for column in model.__table__.columns]

    def read(session):  # type: ignore[no-untyped-def]
        rows = session.scalars(query).all()
        return [{column: getattr(row, column) for column in columns} for row in rows]

    return pd.DataFrame(store.read(read), columns=columns)


def batch_is_demo(store: Store, batch_id: int) -> bool:
    return bool(store.read(lambda session: session.scalar(select(Batch.is_demo).where(Batch.id == batch_id))))


def export_batch(store: Store, batch_id: int, out_dir: Path, fmt: str) -> list[Path]:
    """Write runs, turns and judgements of a batch as CSV or JSON files into ``out_dir``."""
    if fmt not in ("csv", "json"):
        raise ValueError(f"Unknown export format {fmt!r}; use csv or json.")
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {"runs": runs_frame(store, batch_id), "turns": turns_frame(store, batch_id), "judgements": judgements_frame(store, batch_id)}
    demo = batch_is_demo(store, batch_id)
    written: list[Path] = []

    for name, frame in frames.items():
        path = out_dir / f"batch-{batch_id}-{name}.{fmt}"
        if fmt == "csv":
            if demo:
                frame = frame.assign(notice=DEMO_NOTICE)
            write_csv(frame, path)
        else:
            payload = {"batch_id": batch_id, "demo": demo, "notice": DEMO_NOTICE if demo else None, "rows": json.loads(frame.to_json(orient="records", date_format="iso"))}
            path.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
        written.append(path)
    return written
