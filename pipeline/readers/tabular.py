"""Reader for generic tables (parquet, CSV, JSONL) with an image path and a caption per row."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.readers import RawRecord, text_or_bytes, unescape_surrogates

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


@dataclass
class Columns:
    """Column names; `id` and `itm` are optional in the table (row number / 1 when absent)."""

    id: str = "id"
    image: str = "image_path"
    caption: str = "caption"
    itm: str = "itm"


def table_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unknown table format {suffix!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[suffix]


def _iter_csv(path: Path) -> Iterator[dict[str, Any] | str]:
    # surrogateescape keeps undecodable bytes so one bad row is rejected, not the whole file.
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    yield from csv.DictReader(io.StringIO(text, newline=""))


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

    pf = pq.ParquetFile(path)
    wanted = [c for c in (cols.id, cols.image, cols.caption, cols.itm) if c in pf.schema.names]
    for batch in pf.iter_batches(columns=wanted, batch_size=4096):
        yield from batch.to_pylist()


def _field(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if isinstance(value, str):
        return unescape_surrogates(value)
    if isinstance(value, bytes | bytearray):
        return text_or_bytes(bytes(value))
    return value


def read_table(
    path: str | os.PathLike,
    columns: Columns | None = None,
    image_root: str | os.PathLike | None = None,
    source: str = "table",
) -> Iterator[RawRecord]:
    """Yield a record per row; relative image paths resolve against `image_root` or the table's
    folder. Rows that cannot be parsed come back as records with a `problem`."""
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
        problem = None
        rec_id = _field(row, cols.id)
        if rec_id is None or rec_id == "":
            rec_id = fallback_id
        elif isinstance(rec_id, bytes):
            rec_id, problem = fallback_id, "table: id is not UTF-8"
        image = _field(row, cols.image)
        if isinstance(image, bytes):
            image, problem = None, problem or "table: image path is not UTF-8"
        image_path = str(root / image) if image else None  # absolute paths survive the join
        itm_raw = row.get(cols.itm, 1)
        try:
            itm = 1 if itm_raw is None or itm_raw == "" else int(itm_raw)
            if itm not in (0, 1):
                raise ValueError
        except (TypeError, ValueError):
            itm, problem = 1, problem or f"table: itm must be 0 or 1, got {itm_raw!r}"
        yield RawRecord(
            id=str(rec_id),
            source=source,
            image_path=image_path,
            caption=_field(row, cols.caption),
            itm=itm,
            problem=problem,
        )
