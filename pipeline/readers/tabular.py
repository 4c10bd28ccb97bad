"""Reader for generic tables (parquet, CSV, JSONL) with an image path and a caption per row."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.readers.records import RawRecord, image_under_root
from pipeline.readers.rows import Columns, field_value, path_field, row_record
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


def _iter_csv(path: Path) -> Iterator[dict[str, Any] | str]:
    # Streamed; surrogateescape keeps undecodable bytes so one bad row is rejected, not the file.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # the rest of the file is still read
                yield f"table: unreadable CSV row ({exc})"
                continue
            yield row


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any] | str]:
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as exc:
                yield f"table: invalid JSON line ({exc.msg})"
                continue
            yield row if isinstance(row, dict) else "table: JSON line is not an object"


def _iter_parquet(path: Path, cols: Columns) -> Iterator[dict[str, Any] | str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise InputError(f"{path} is not a readable parquet file ({exc})", "check --input") from exc
    wanted = [c for c in (cols.id, cols.image, cols.caption, cols.itm) if c in pf.schema.names]
    for batch in pf.iter_batches(columns=wanted, batch_size=4096):
        yield from batch.to_pylist()


def read_table(
    path: str | os.PathLike,
    columns: Columns | None = None,
    image_root: str | os.PathLike | None = None,
    source: str = "table",
    allow_outside_root: bool = False,
) -> Iterator[RawRecord]:
    """Yield a record per row; relative image paths resolve against `image_root` or the table's
    folder and may not leave it (unless `allow_outside_root`). Rows that cannot be parsed come
    back as records with a `problem`."""
    path = Path(path)
    cols = columns or Columns()
    fmt = table_format(path)
    rows = {"csv": _iter_csv, "jsonl": _iter_jsonl}.get(fmt)
    iterator = rows(path) if rows else _iter_parquet(path, cols)
    root = Path(image_root) if image_root is not None else path.parent
    for n, row in enumerate(iterator):
        fallback_id = f"{path.stem}-{n:08d}"
        if isinstance(row, str):
            yield RawRecord(fallback_id, source, None, None, problem=row)
            continue
        image, problem = path_field(field_value(row, cols.image), "table")
        if image is not None:
            image, problem = image_under_root(image, root, allow_outside_root)
        yield row_record(row, cols, fallback_id, source, image, problem, "table")
