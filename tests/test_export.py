"""Streamed CSV and JSON files: the same bytes as one whole frame, in chunks of any size.

The expected files are made the way hermitkit made them before it streamed: the whole
table as one DataFrame, then ``write_csv`` or ``json.dumps``. Chunks of 1, 2 and 3 rows
split runs, turns and timestamp precisions across chunk borders.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import delete, select, update

from hermitkit import analysis, export
from hermitkit.export import DEMO_NOTICE, FORMULA_PREFIXES, column_formats, export_batch, frame_chunks, turns_query, write_csv
from hermitkit.reports import write_report
from hermitkit.store import Judgement, Run, Store, Turn
from tests.test_analysis import insert_batch, verdict

FORMULAS = ["=1+2", "+cmd", "-2-3", "@SUM(A1)", "\tindent", "\rreturn"]
NON_ASCII = "Grüße, 日本語 and 🦀; line\u2028separator, \u0085 next line"
TRICKY = 'comma, "quotes"\nand a new line'
BASE_TIME = datetime(2026, 12, 4, 10, 0, 0, tzinfo=UTC)


def mixed_batch(store: Store, *, precise: int | None, is_demo: bool = False) -> int:
    """Store a batch with formula cells, non-ASCII text, NULL gaps and controlled timestamps.

    Every timestamp falls on a whole second except that of the fourth turn row, which
    gets ``precise`` microseconds, so some chunks alone would need fewer digits.
    """
    runs = [
        {"model": "m/b", "replies": ["{" + FORMULAS[0] + "}", FORMULAS[1], TRICKY + " {ok}"], "judgements": [verdict(analysis=FORMULAS[3], topics=["=cmd", NON_ASCII])]},
        {"model": "m/a", "replies": [NON_ASCII + " {" + NON_ASCII + "}", FORMULAS[2], FORMULAS[3]], "judgements": [verdict(status="parse_failed", failure_reason="no_json", raw_reply=FORMULAS[4])]},
        {"model": "m/b", "replies": [FORMULAS[4] + " {x}", FORMULAS[5]], "judgements": [verdict(autonomy=None, sophistication=5)]},
    ]
    batch_id = insert_batch(store, runs, is_demo=is_demo, temperature=0.7)

    def write(session):  # type: ignore[no-untyped-def]
        run_ids = session.scalars(select(Run.id).where(Run.batch_id == batch_id)).all()
        turns = session.scalars(select(Turn).where(Turn.run_id.in_(run_ids)).order_by(Turn.id)).all()
        for number, turn in enumerate(turns):
            turn.created_at = BASE_TIME + timedelta(seconds=number)
            if turn.role == "assistant":
                # Tokens on assistant turns only, so the integer columns have NULL gaps.
                turn.prompt_tokens = 100 + number
                turn.completion_tokens = 7
                turn.cost_usd = 0.000123456789012345 * (number + 1)
        if precise is not None:
            turns[3].created_at = BASE_TIME + timedelta(seconds=3, microseconds=precise)
        session.execute(update(Run).where(Run.id.in_(run_ids)).values(started_at=BASE_TIME))

    store.write(write)
    return batch_id


# ---------------------------------------------------------------------------
# Expected files, from whole frames
# ---------------------------------------------------------------------------


def whole_export_frames(store: Store, batch_id: int) -> dict[str, pd.DataFrame]:
    """The tables of ``export_batch`` as whole frames, read through the ORM."""

    def frame(query: Any, model: Any) -> pd.DataFrame:
        columns = [column.key for column in model.__table__.columns]
        rows = store.read(lambda session: [{column: getattr(row, column) for column in columns} for row in session.scalars(query).all()])
        return pd.DataFrame(rows, columns=columns)

    runs = frame(select(Run).where(Run.batch_id == batch_id).order_by(Run.id), Run)
    turns = frame(select(Turn).join(Run, Run.id == Turn.run_id).where(Run.batch_id == batch_id).order_by(Turn.run_id, Turn.idx), Turn)
    turns.insert(1, "model", turns["run_id"].map(runs.set_index("id")["model"]))
    judgements = frame(select(Judgement).join(Run, Run.id == Judgement.run_id).where(Run.batch_id == batch_id).order_by(Judgement.id), Judgement)
    return {"runs": runs, "turns": turns, "judgements": judgements}


def expected_export(store: Store, batch_id: int, fmt: str, out_dir: Path, *, is_demo: bool) -> dict[str, bytes]:
    out_dir.mkdir()
    files = {}
    for name, frame in whole_export_frames(store, batch_id).items():
        path = out_dir / f"batch-{batch_id}-{name}.{fmt}"
        if fmt == "csv":
            write_csv(frame.assign(notice=DEMO_NOTICE) if is_demo else frame, path)
        else:
            payload = {"batch_id": batch_id, "demo": is_demo, "notice": DEMO_NOTICE if is_demo else None, "rows": json.loads(frame.to_json(orient="records", date_format="iso"))}
            path.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
        files[path.name] = path.read_bytes()
    return files


def csv_cells(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [cell for row in csv.reader(handle) for cell in row]


# ---------------------------------------------------------------------------
# Streamed files against whole frames
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 1000])
@pytest.mark.parametrize("precise", [None, 5000, 123456], ids=["seconds", "milliseconds", "microseconds"])
def test_report_turns_csv_matches_whole_frame(store, tmp_path, monkeypatch, chunk_rows, precise):
    batch_id = mixed_batch(store, precise=precise)
    expected = write_csv(analysis.turns_frame(store, batch_id), tmp_path / "expected.csv").read_bytes()

    monkeypatch.setattr(export, "CHUNK_ROWS", chunk_rows)
    write_report(store, batch_id, tmp_path / "report", ["csv"])

    assert (tmp_path / "report" / f"batch-{batch_id}-turns.csv").read_bytes() == expected


@pytest.mark.parametrize("fmt", ["csv", "json"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_export_matches_whole_frames(store, tmp_path, fmt, chunk_rows):
    batch_id = mixed_batch(store, precise=123456)
    expected = expected_export(store, batch_id, fmt, tmp_path / "expected", is_demo=False)

    paths = export_batch(store, batch_id, tmp_path / "streamed", fmt, chunk_rows=chunk_rows)

    assert {path.name: path.read_bytes() for path in paths} == expected


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_of_demo_batch_matches_whole_frames(store, tmp_path, fmt):
    batch_id = mixed_batch(store, precise=5000, is_demo=True)
    expected = expected_export(store, batch_id, fmt, tmp_path / "expected", is_demo=True)

    paths = export_batch(store, batch_id, tmp_path / "streamed", fmt, chunk_rows=2)

    assert {path.name: path.read_bytes() for path in paths} == expected


def test_report_demo_turns_csv_matches_whole_frame(store, tmp_path, monkeypatch):
    batch_id = mixed_batch(store, precise=123456, is_demo=True)
    expected = write_csv(analysis.turns_frame(store, batch_id).assign(notice=DEMO_NOTICE), tmp_path / "expected.csv").read_bytes()

    monkeypatch.setattr(export, "CHUNK_ROWS", 2)
    write_report(store, batch_id, tmp_path / "report", ["csv"])

    assert (tmp_path / "report" / f"batch-{batch_id}-turns.csv").read_bytes() == expected


def test_streamed_csv_neutralises_formulas(store, tmp_path):
    batch_id = mixed_batch(store, precise=None)
    (path,) = [path for path in export_batch(store, batch_id, tmp_path, "csv", chunk_rows=1) if path.name.endswith("-turns.csv")]

    cells = csv_cells(path)
    for cell in cells:
        assert not cell.startswith(FORMULA_PREFIXES), cell
    for formula in FORMULAS:
        assert any(cell.startswith("'" + formula) for cell in cells), formula
    assert NON_ASCII + " {" + NON_ASCII + "}" in cells
    assert TRICKY + " {ok}" in cells

    # Every cell that contains a CR or LF is quoted, so a reader gets one row per turn.
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    stored = store.read(lambda session: session.query(Turn).join(Run).filter(Run.batch_id == batch_id).count())
    assert len(rows) == 1 + stored


def test_csv_quotes_bare_carriage_return(tmp_path):
    frame = pd.DataFrame({"content": ["line\rnext", "plain"], "n": [1, 2]})

    path = write_csv(frame, tmp_path / "cr.csv")

    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["content", "n"], ["line\rnext", "1"], ["plain", "2"]]
    assert pd.read_csv(path)["content"].tolist() == ["line\rnext", "plain"]
    assert path.read_bytes().endswith(b"\r\n")


# ---------------------------------------------------------------------------
# Tables without rows, column formats and chunk sizes
# ---------------------------------------------------------------------------


def batch_without_turns(store: Store, *, is_demo: bool = False) -> int:
    batch_id = insert_batch(store, [{"model": "m/a", "replies": ["{x}"]}], is_demo=is_demo)
    store.write(lambda session: session.execute(delete(Turn)))
    return batch_id


def test_report_turns_csv_of_batch_without_turns(store, tmp_path):
    batch_id = batch_without_turns(store)
    expected = write_csv(analysis.turns_frame(store, batch_id), tmp_path / "expected.csv").read_bytes()

    write_report(store, batch_id, tmp_path / "report", ["csv"])

    assert (tmp_path / "report" / f"batch-{batch_id}-turns.csv").read_bytes() == expected


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_of_batch_without_turns(store, tmp_path, fmt):
    batch_id = batch_without_turns(store, is_demo=True)

    (path,) = [path for path in export_batch(store, batch_id, tmp_path, fmt) if "-turns." in path.name]

    if fmt == "csv":
        header = path.read_text(encoding="utf-8").splitlines()
        assert header == [",".join(["id", "model", *[column.key for column in Turn.__table__.columns][1:], "notice"])]
    else:
        assert json.loads(path.read_text(encoding="utf-8")) == {"batch_id": batch_id, "demo": True, "notice": DEMO_NOTICE, "rows": []}


@pytest.mark.parametrize(("precise", "digits"), [(None, 0), (5000, 3), (123456, 6), (1, 6)])
def test_column_formats_read_whole_columns(store, precise, digits):
    batch_id = mixed_batch(store, precise=precise)

    formats = store.read(lambda session: column_formats(session, turns_query(batch_id)))

    assert formats.fraction_digits == {"created_at": digits}
    assert formats.float_columns == {"turn_number", "prompt_tokens", "completion_tokens"}


def test_frame_chunks_hold_at_most_chunk_rows(store):
    batch_id = mixed_batch(store, precise=None)
    query = turns_query(batch_id)

    def sizes(session):  # type: ignore[no-untyped-def]
        formats = column_formats(session, query)
        return [len(chunk) for chunk in frame_chunks(session, query, formats, chunk_rows=4)]

    # three runs of 3, 3 and 2 replies store 7, 7 and 5 turn rows
    assert store.read(sizes) == [4, 4, 4, 4, 3]


def test_frame_chunks_reject_zero_rows(store):
    query = turns_query(1)
    with pytest.raises(ValueError, match="at least 1"):
        store.read(lambda session: next(frame_chunks(session, query, column_formats(session, query), chunk_rows=0)))
