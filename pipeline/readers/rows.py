"""One row of named fields -> a `RawRecord`: the id, image, caption and itm rules that the table
and Hugging Face readers share (a bad field becomes a reader problem, never an exception)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from pipeline.readers.records import RawRecord, text_or_bytes, unescape_surrogates
from pmu.errors import InputError


@dataclass
class Columns:
    """Column names; `id` and `itm` are optional in the table (row number / 1 when absent)."""

    id: str = "id"
    image: str = "image_path"
    caption: str = "caption"
    itm: str = "itm"


COLUMN_OPTIONS = "--image-col, --caption-col, --id-col, --itm-col"
SHOWN_COLUMNS = 20  # a wide table's column list is cut here, so the error stays one line


def column_list(found: list[str]) -> str:
    """The column names for an error message, the first `SHOWN_COLUMNS` of them."""
    shown = ", ".join(repr(c) for c in found[:SHOWN_COLUMNS])
    more = len(found) - SHOWN_COLUMNS
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"


def missing_column(found: list[str], cols: Columns) -> tuple[str, str] | None:
    """(option, column) of the first needed column that is not in `found`, else None.

    The image and caption columns are needed; the id and itm columns only when named off
    their defaults (a table without `id` or `itm` columns is fine, but `--id-col uid` that
    names no column is a typo worth stopping for).
    """
    default = Columns()
    for option, column, needed in (
        ("--image-col", cols.image, True),
        ("--caption-col", cols.caption, True),
        ("--id-col", cols.id, cols.id != default.id),
        ("--itm-col", cols.itm, cols.itm != default.itm),
    ):
        if needed and column not in found:
            return option, column
    return None


def require_columns(found: list[str], cols: Columns, where: str, note: str = "") -> None:
    """InputError naming the columns there are, when a needed column is not among them."""
    missing = missing_column(found, cols)
    if missing is not None:
        option, column = missing
        raise InputError(
            f"{where} has no column {column!r} (its columns: {column_list(found)})",
            f"choose with {option}; the column options are {COLUMN_OPTIONS}{note}",
        )


def field_value(row: dict[str, Any], name: str) -> Any:
    """A field with text decoded: str (undecodable bytes restored), bytes, or the raw value."""
    value = row.get(name)
    if isinstance(value, str):
        return unescape_surrogates(value)
    if isinstance(value, bytes | bytearray):
        return text_or_bytes(bytes(value))
    return value


def parse_itm(value: Any) -> int | None:
    """0 or 1, or None when the value is not exactly 0 or 1.

    Accepted: the integers 0 and 1, the floats 0.0 and 1.0, and text holding one of these
    ("1", " 0 ", "1.0": CSV cells). Refused: any other number (0.5 and 1.9 are not rounded),
    booleans (true could mean "matched" or, as in NewsCLIPpings, "falsified") and other text.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value) if value in (0, 1) else None
    if isinstance(value, numbers.Real):
        return int(value) if float(value) in (0.0, 1.0) else None
    if isinstance(value, str) and value.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(value))
    return None


def itm_field(value: Any, prefix: str) -> tuple[int, str | None]:
    """(itm, problem): missing or empty means a matched pair (1)."""
    if value is None or value == "":
        return 1, None
    itm = parse_itm(value)
    if itm is None:
        return 1, f"{prefix}: itm must be 0 or 1 (got {value!r})"
    return itm, None


def id_field(value: Any, fallback_id: str, prefix: str) -> tuple[str, str | None]:
    """(id, problem): text or an integer; missing means the fallback (row number) id."""
    if value is None or value == "":
        return fallback_id, None
    if isinstance(value, bytes):
        return fallback_id, f"{prefix}: id is not UTF-8"
    if isinstance(value, str):
        return value, None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value)), None
    return fallback_id, f"{prefix}: id is not text or an integer ({type(value).__name__})"


def path_field(value: Any, prefix: str) -> tuple[str | None, str | None]:
    """(relative-or-absolute path text, problem) of an image path cell."""
    if value is None or value == "":
        return None, None  # prepare rejects it as `image: no path`
    if isinstance(value, bytes):
        return None, f"{prefix}: image path is not UTF-8"
    if not isinstance(value, str):
        return None, f"{prefix}: image path is not text ({type(value).__name__})"
    return value, None


def row_record(
    row: dict[str, Any],
    cols: Columns,
    fallback_id: str,
    source: str,
    image_path: str | None,
    image_problem: str | None,
    prefix: str,
) -> RawRecord:
    """The record of one row whose image the caller resolved (`image_path` / `image_problem`);
    the first problem found (id, image, itm) rejects it."""
    rec_id, id_problem = id_field(field_value(row, cols.id), fallback_id, prefix)
    itm, itm_problem = itm_field(row.get(cols.itm), prefix)
    return RawRecord(
        id=rec_id,
        source=source,
        image_path=image_path,
        caption=field_value(row, cols.caption),
        itm=itm,
        problem=id_problem or image_problem or itm_problem,
    )
