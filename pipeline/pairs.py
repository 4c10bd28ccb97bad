"""The records of prepare's outputs: `Pair` (a row of pairs.parquet), `Rejection` (a line of
rejected.jsonl) and their atomic writers. Shared by `pipeline.prepare` and its work folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from pmu.io import atomic_path


@dataclass
class Pair:
    """One accepted pair: a row of pairs.parquet."""

    id: str
    source: str
    image_path: str
    caption: str
    itm: int
    width: int
    height: int


@dataclass
class Rejection:
    id: str
    source: str
    stage: str
    reason: str
    detail: str = ""


def write_pairs_parquet(pairs: list[Pair], path: str | os.PathLike) -> None:
    """The pairs table with the contract's column types, written to a temp file then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("image_path", pa.string()),
            ("caption", pa.string()),
            ("itm", pa.int8()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )
    columns = {name: [getattr(p, name) for p in pairs] for name in schema.names}
    table = pa.table(columns, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_jsonl_atomic(rows: Iterable[dict], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
