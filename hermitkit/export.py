"""Tables of a batch as pandas frames, and safe CSV and JSON files of them.

Model output is untrusted: a CSV cell that starts like a spreadsheet formula is
prefixed with an apostrophe so that Excel, LibreOffice and Google Sheets show it as
text instead of running it.

Files of large tables are streamed: rows come from the database ``CHUNK_ROWS`` at a
time and each chunk is written before the next is read, so memory does not grow with
the batch. The files are byte for byte those that one whole frame of the table gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import BigInteger, DateTime, Integer, Select, case, cast, extract, func, select
from sqlalchemy.orm import Session

from hermitkit.store import Batch, Judgement, Run, Store, Turn

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

DEMO_NOTICE = "DEMO DATA: produced by hermitkit's scripted offline demo models; it describes no real model."

# Rows fetched and written per step of a streamed file, read when a file is written.
CHUNK_ROWS = 10_000

# Changes each chunk (or the empty frame of a table without rows) before it is written.
Transform = Callable[[pd.DataFrame], pd.DataFrame]


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


# RFC 4180 line ends. Python's csv writer quotes a cell that contains any character of
# the line terminator, so with "\r\n" a bare CR in model output is quoted too. With "\n"
# alone it was written unquoted, and readers started a new row at the CR.
CSV_LINE_TERMINATOR = "\r\n"


def safe_csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of ``frame`` with list and dict cells as JSON and formula-like text neutralised.

    Text columns of every dtype are checked: object, pandas' string dtype (the default
    for text from pandas 3) and categories. The index and column names are checked too.
    """
    safe = frame.copy()
    for column in safe.columns:
        series = safe[column]
        if isinstance(series.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(series) or series.dtype == object:
            safe[column] = pd.Series(_safe_cells(series), index=series.index, dtype=object)
    safe.columns = [neutralize_formula(column) for column in safe.columns]
    if safe.index.dtype == object or pd.api.types.is_string_dtype(safe.index):
        safe.index = safe.index.map(neutralize_formula)
    return safe


def _safe_cells(series: pd.Series) -> list[Any]:
    # A list comprehension, because Series.map costs several times more per cell on large tables.
    if isinstance(series.dtype, pd.StringDtype):
        # A string column holds only text and missing values, never lists or dicts.
        return [neutralize_formula(value) for value in series.to_numpy(dtype=object)]
    return [neutralize_formula(_json_cell(value)) for value in series.to_numpy(dtype=object)]


def write_csv(frame: pd.DataFrame, path: Path, *, index: bool = False) -> Path:
    """Write ``frame`` as UTF-8 CSV after ``safe_csv_frame``; quoted cells keep newlines, commas and quotes."""
    safe_csv_frame(frame).to_csv(path, index=index, encoding="utf-8", lineterminator=CSV_LINE_TERMINATOR)
    return path


# ---------------------------------------------------------------------------
# Tables of a batch
# ---------------------------------------------------------------------------


def runs_query(batch_id: int) -> Select[Any]:
    """Select every column of the batch's runs, in run id order."""
    return select(*Run.__table__.columns).where(Run.batch_id == batch_id).order_by(Run.id)


def turns_query(batch_id: int) -> Select[Any]:
    """Select every column of the batch's turns, with the run's model after the turn id, in run and turn order."""
    columns = list(Turn.__table__.columns)
    query = select(columns[0], Run.model, *columns[1:]).join(Run, Run.id == Turn.run_id)
    return query.where(Run.batch_id == batch_id).order_by(Turn.run_id, Turn.idx)


def judgements_query(batch_id: int) -> Select[Any]:
    """Select every column of the batch's verdicts, in verdict id order."""
    query = select(*Judgement.__table__.columns).join(Run, Run.id == Judgement.run_id)
    return query.where(Run.batch_id == batch_id).order_by(Judgement.id)


def runs_frame(store: Store, batch_id: int) -> pd.DataFrame:
    return _frame(store, runs_query(batch_id))


def turns_frame(store: Store, batch_id: int) -> pd.DataFrame:
    return _frame(store, turns_query(batch_id))


def judgements_frame(store: Store, batch_id: int) -> pd.DataFrame:
    return _frame(store, judgements_query(batch_id))


def _frame(store: Store, query: Select[Any]) -> pd.DataFrame:
    def read(session):  # type: ignore[no-untyped-def]
        result = session.execute(query)
        return list(result.keys()), [tuple(row) for row in result]

    columns, rows = store.read(read)
    return pd.DataFrame.from_records(rows, columns=columns)


def batch_is_demo(store: Store, batch_id: int) -> bool:
    return bool(store.read(lambda session: session.scalar(select(Batch.is_demo).where(Batch.id == batch_id))))


# ---------------------------------------------------------------------------
# Streamed files
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnFormats:
    """Facts about whole columns that decide how pandas writes them, read before streaming.

    pandas stores an integer column with a NULL as float64, so every number in it is
    written as ``3.0``. It writes all timestamps of a column with the sub-second digits
    (0, 3 or 6) that the most precise one needs. A chunk alone could decide otherwise.
    """

    float_columns: frozenset[str]
    fraction_digits: Mapping[str, int]


def column_formats(session: Session, query: Select[Any]) -> ColumnFormats:
    """Read the ``ColumnFormats`` of the rows of ``query`` with one aggregate query that fetches no text."""
    rows = query.order_by(None).subquery()
    integers = [column for column in rows.c if isinstance(column.type, Integer)]
    timestamps = [column for column in rows.c if isinstance(getattr(column.type, "impl_instance", column.type), DateTime)]
    if not integers and not timestamps:
        return ColumnFormats(frozenset(), {})

    aggregates: list[Any] = [func.count()]
    aggregates += [func.count(column) for column in integers]
    for column in timestamps:
        microseconds = _microseconds(column, session.get_bind().dialect.name)
        aggregates.append(func.max(case((microseconds % 1000 != 0, 1), else_=0)))
        aggregates.append(func.max(case((microseconds != 0, 1), else_=0)))
    total, *counts = session.execute(select(*aggregates).select_from(rows)).one()

    filled = counts[: len(integers)]
    float_columns = frozenset(column.key for column, count in zip(integers, filled, strict=True) if 0 < count < total)

    digits = {}
    flags = iter(counts[len(integers) :])
    for column in timestamps:
        below_millisecond, below_second = next(flags), next(flags)
        if below_millisecond:
            digits[column.key] = 6
        elif below_second:
            digits[column.key] = 3
        else:
            digits[column.key] = 0
    return ColumnFormats(float_columns, digits)


def _microseconds(column: Any, dialect: str) -> Any:
    """Build the SQL expression for the microseconds within the second of a timestamp column."""
    if dialect == "sqlite":
        # SQLAlchemy stores SQLite timestamps as text, "YYYY-MM-DD HH:MM:SS.ffffff".
        return cast(func.substr(column, 21, 6), Integer)
    # PostgreSQL: the seconds field with its fraction, in microseconds.
    return cast(extract("microseconds", column), BigInteger) % 1_000_000


def frame_chunks(session: Session, query: Select[Any], formats: ColumnFormats, *, chunk_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """Yield the rows of ``query`` as frames of at most ``chunk_rows`` rows, with the dtypes of one whole frame.

    ``chunk_rows`` defaults to ``CHUNK_ROWS``. The query runs inside ``session``'s
    transaction, with a server-side cursor where the database has one, so only one
    chunk is in memory at a time.
    """
    size = CHUNK_ROWS if chunk_rows is None else chunk_rows
    if size < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {size}.")
    # Core execution: the rows are plain columns, so the ORM's per-row loading is wasted work.
    result = session.connection().execute(query.execution_options(yield_per=size))
    columns = list(result.keys())
    for rows in result.partitions():
        frame = pd.DataFrame.from_records([tuple(row) for row in rows], columns=columns)
        for column in formats.float_columns:
            frame[column] = frame[column].astype(float)
        yield frame


def _empty_frame(query: Select[Any]) -> pd.DataFrame:
    return pd.DataFrame(columns=[column.key for column in query.selected_columns])


def _timestamps_as_text(frame: pd.DataFrame, formats: ColumnFormats) -> pd.DataFrame:
    """Turn UTC timestamp columns into text with their whole column's sub-second digits.

    The text is what pandas writes for the whole column, "2026-12-04 10:00:00.123456+00:00",
    made with numpy, which is also several times faster than pandas' own formatting.
    """
    for column, digits in formats.fraction_digits.items():
        if column not in frame or not isinstance(frame[column].dtype, pd.DatetimeTZDtype):
            continue
        values = frame[column]
        if str(values.dtype.tz) != "UTC":
            # NOTE: hermitkit stores every timestamp as UTC (UTCDateTime), so other zones are
            # left to pandas, which picks the digits per chunk.
            continue
        instants = values.dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
        text = np.datetime_as_string(instants, unit={0: "s", 3: "ms", 6: "us"}[digits])
        text = np.char.add(np.char.replace(text, "T", " "), "+00:00")
        frame[column] = pd.Series(text, index=values.index, dtype=object).where(values.notna())
    return frame


def stream_csv(store: Store, query: Select[Any], path: Path, *, transform: Transform | None = None, chunk_rows: int | None = None) -> Path:
    """Write the rows of ``query`` to ``path`` as UTF-8 CSV, ``chunk_rows`` (default ``CHUNK_ROWS``) at a time.

    ``transform`` changes each chunk before it is written, and the empty frame of a
    query without rows, whose columns make the header. The file is the same as
    ``write_csv`` of the whole frame after ``transform``: same header, formula
    neutralising, number and timestamp formats.
    """
    step = transform or (lambda frame: frame)

    def write(session: Session) -> Path:
        formats = column_formats(session, query)
        # Opened inside the transaction, so a retried read starts the file again.
        with path.open("w", encoding="utf-8", newline="") as handle:
            header = True
            for chunk in frame_chunks(session, query, formats, chunk_rows=chunk_rows):
                frame = _timestamps_as_text(step(chunk), formats)
                # One write per chunk: pandas writing row by row into the file costs more.
                handle.write(safe_csv_frame(frame).to_csv(index=False, header=header, lineterminator=CSV_LINE_TERMINATOR))
                header = False
            if header:
                handle.write(safe_csv_frame(step(_empty_frame(query))).to_csv(index=False, lineterminator=CSV_LINE_TERMINATOR))
        return path

    return store.read(write)


def stream_json(store: Store, query: Select[Any], path: Path, *, head: Mapping[str, Any], chunk_rows: int | None = None) -> Path:
    """Write ``{**head, "rows": [...]}`` with the rows of ``query`` as indented UTF-8 JSON, ``chunk_rows`` at a time.

    The file is the same as ``json.dumps`` with ``indent=2`` of the payload whose rows
    come from the whole frame's ``to_json(orient="records", date_format="iso")``.
    """

    def write(session: Session) -> Path:
        formats = column_formats(session, query)
        # The placeholder row 0 is the last 0 of the text, because "rows" is the last key.
        opening, closing = json.dumps({**head, "rows": [0]}, indent=2, ensure_ascii=False).rsplit("0", 1)
        with path.open("w", encoding="utf-8") as handle:
            written = 0
            for chunk in frame_chunks(session, query, formats, chunk_rows=chunk_rows):
                for row in json.loads(chunk.to_json(orient="records", date_format="iso")):
                    handle.write(opening if written == 0 else ",\n    ")
                    # json.dumps escapes newlines inside strings, so every "\n" starts a line.
                    handle.write(json.dumps(row, indent=2, ensure_ascii=False).replace("\n", "\n    "))
                    written += 1
            handle.write(closing if written else json.dumps({**head, "rows": []}, indent=2, ensure_ascii=False))
        return path

    return store.read(write)


def export_batch(store: Store, batch_id: int, out_dir: Path, fmt: str, *, chunk_rows: int | None = None) -> list[Path]:
    """Write runs, turns and judgements of a batch as CSV or JSON files into ``out_dir``.

    Each table is streamed ``chunk_rows`` rows at a time, so memory does not grow with it.
    """
    if fmt not in ("csv", "json"):
        raise ValueError(f"Unknown export format {fmt!r}; use csv or json.")
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = {"runs": runs_query(batch_id), "turns": turns_query(batch_id), "judgements": judgements_query(batch_id)}
    demo = batch_is_demo(store, batch_id)
    written: list[Path] = []

    for name, query in queries.items():
        path = out_dir / f"batch-{batch_id}-{name}.{fmt}"
        if fmt == "csv":
            transform = (lambda frame: frame.assign(notice=DEMO_NOTICE)) if demo else None
            stream_csv(store, query, path, transform=transform, chunk_rows=chunk_rows)
        else:
            head = {"batch_id": batch_id, "demo": demo, "notice": DEMO_NOTICE if demo else None}
            stream_json(store, query, path, head=head, chunk_rows=chunk_rows)
        written.append(path)
    return written
