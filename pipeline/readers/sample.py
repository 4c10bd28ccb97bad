"""Reader for the bundled sample (`pipeline/sample/captions.jsonl` + `images/`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.readers.records import RawRecord, image_under_root
from pipeline.readers.rows import itm_field

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample"


def default_sample_dir() -> str:
    """The bundled sample folder, relative to the working directory when it lies below it."""
    try:
        return os.path.relpath(SAMPLE_DIR)
    except ValueError:  # another drive on Windows
        return str(SAMPLE_DIR)


def read_sample(
    root: str | os.PathLike | None = None, allow_outside_root: bool = False
) -> Iterator[RawRecord]:
    """Yield the sample's pairs (matched and the listed mismatched ones) in file order.
    `image` paths are relative to the folder and may not leave it (unless allowed)."""
    root = Path(root) if root is not None else Path(default_sample_dir())
    with open(root / "captions.jsonl", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec_id = f"sample-line-{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRecord(rec_id, "sample", None, None, problem=f"sample: bad JSON ({exc})")
                continue
            if not isinstance(row, dict):
                yield RawRecord(rec_id, "sample", None, None, problem="sample: not an object")
                continue
            image, problem = None, None
            if isinstance(row.get("image"), str) and row["image"]:
                image, problem = image_under_root(row["image"], root, allow_outside_root)
            itm, itm_problem = itm_field(row.get("itm"), "sample")
            yield RawRecord(
                id=str(row.get("id") or rec_id),
                source="sample",
                image_path=image,
                caption=row.get("caption"),
                itm=itm,
                problem=problem or itm_problem,
            )
