"""Reader for generic tables (parquet, CSV, JSONL) with an image path and a caption per row."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.readers.records import RawRecord, image_under_root, short_error
from pipeline.readers.rows import Columns, field_value, path_field, require_columns, row_record
from pmu.errors import InputError

__all__ = ["Columns", "read_table", "table_format"]

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl"}
# A CSV cell may be this long before the csv module refuses it; longer captions are then
# rejected by prepare's caption limit instead of stopping the whole file (the module's own
# default is 128 KiB).
CSV_FIELD_LIMIT = 1 << 28


def table_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"unknown table format {suffix!r} of {path}",
            f"use a table ending in one of {sorted(FORMATS)}",
        )
    return FORMATS[suffix]


# Reasons of rows a table reader cannot hand on (each rejects that row only).
FIELD_COUNT = "table: wrong number of fields"
PARQUET_UNREADABLE = "table: unreadable parquet data"

Rows = Iterator[dict[str, Any] | str]  # a row, or the reason it could not be read


# Each text table is opened once and its head read before the rows are handed on, so a fifo
# or a pipe (read only once) works as well as a file.


def _open_csv(path: Path):
    # surrogateescape keeps undecodable bytes so one bad row is rejected, not the file.
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _csv_header(path: Path, reader) -> list[str]:
    """The header row; a repeated name stops the run (which column is meant is unknowable)."""
    try:
        header = next(reader, [])
    except csv.Error as exc:
        raise InputError(f"{path}: unreadable CSV header ({exc})", "fix its first line") from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(
            f"{path}: the CSV header repeats the column {repeated[0]!r}",
            "give every column its own name",
        )
    return header


def _iter_csv(f, reader, header: list[str]) -> Rows:
    """Rows as dicts; a row with more or fewer fields than the header is refused, since its
    values can no longer be matched to their columns (an unquoted comma shifts them)."""
    with f:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # the rest of the file is still read
                yield f"table: unreadable CSV row ({exc})"
                continue
            if not row:  # a blank line (csv.DictReader skips these too)
                continue
            if len(row) != len(header):
                yield f"{FIELD_COUNT} (row has {len(row)} fields, the header has {len(header)})"
                continue
            yield dict(zip(header, row, strict=True))


def _csv_rows(path: Path, cols: Columns) -> Rows:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    f = _open_csv(path)
    reader = csv.reader(f)
    try:
        header = _csv_header(path, reader)
        require_columns(header, cols, str(path))
    except BaseException:
        f.close()
        raise
    return _iter_csv(f, reader, header)


def _jsonl_row(raw: bytes) -> dict[str, Any] | str | None:
    """One line: an object, the reason it is none, or None for a blank line."""
    if not raw.strip():
        return None
    try:
        row = json.loads(raw.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        return f"table: invalid JSON line ({exc.msg})"
    return row if isinstance(row, dict) else "table: JSON line is not an object"


def _iter_jsonl(f, head: list[dict[str, Any] | str]) -> Rows:
    with f:
        yield from head
        for raw in f:
            row = _jsonl_row(raw)
            if row is not None:
                yield row


def _jsonl_rows(path: Path, cols: Columns) -> Rows:
    """The columns are those of the first object line (when no line is one, every line is
    rejected with its reason)."""
    f = open(path, "rb")  # noqa: SIM115 (closed by _iter_jsonl, or below)
    head: list[dict[str, Any] | str] = []
    try:
        for raw in f:
            row = _jsonl_row(raw)
            if row is not None:
                head.append(row)
                if isinstance(row, dict):
                    require_columns(list(row), cols, f"{path} (its first object line)")
                    break
    except BaseException:
        f.close()
        raise
    return _iter_jsonl(f, head)


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise InputError(
            f"{path} is not a readable parquet file ({short_error(exc)})", "check --input"
        ) from exc


def _iter_parquet(pf, cols: Columns) -> Rows:
    """Rows, one row group at a time: a group whose pages do not decode rejects its rows that
    were not read yet (with pyarrow's error) and the next group is still read."""
    names = pf.schema_arrow.names
    wanted = [c for c in (cols.id, cols.image, cols.caption, cols.itm) if c in names]
    for group in range(pf.num_row_groups):
        n_rows, done = pf.metadata.row_group(group).num_rows, 0
        try:
            for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=wanted):
                rows = batch.to_pylist()
                done += len(rows)
                yield from rows
        except Exception as exc:  # noqa: BLE001 (OSError, ArrowInvalid, ... for a damaged page)
            problem = f"{PARQUET_UNREADABLE} (row group {group}: {short_error(exc)})"
            for _ in range(n_rows - done):
                yield problem


def _rows(path: Path, cols: Columns) -> Rows:
    """The table's rows, after checking (now, before any is read) that its columns are there."""
    fmt = table_format(path)
    if fmt == "csv":
        return _csv_rows(path, cols)
    if fmt == "jsonl":
        return _jsonl_rows(path, cols)
    pf = _open_parquet(path)
    require_columns(pf.schema_arrow.names, cols, str(path))
    return _iter_parquet(pf, cols)


def read_table(
    path: str | os.PathLike,
    columns: Columns | None = None,
    image_root: str | os.PathLike | None = None,
    source: str = "table",
    allow_outside_root: bool = False,
) -> Iterator[RawRecord]:
    """Yield a record per row; relative image paths resolve against `image_root` or the table's
    folder and may not leave it (unless `allow_outside_root`). Rows that cannot be parsed come
    back as records with a `problem`. A missing image or caption column (or a named id / itm
    column) raises `InputError` here, naming the columns there are."""
    path = Path(path)
    cols = columns or Columns()
    rows = _rows(path, cols)
    root = Path(image_root) if image_root is not None else path.parent
    return _records(rows, path, cols, root, source, allow_outside_root)


def _records(
    rows: Rows, path: Path, cols: Columns, root: Path, source: str, allow_outside_root: bool
) -> Iterator[RawRecord]:
    for n, row in enumerate(rows):
        fallback_id = f"{path.stem}-{n:08d}"
        if isinstance(row, str):
            yield RawRecord(fallback_id, source, None, None, problem=row)
            continue
        image, problem = path_field(field_value(row, cols.image), "table")
        if image is not None:
            image, problem = image_under_root(image, root, allow_outside_root)
        yield row_record(row, cols, fallback_id, source, image, problem, "table")
