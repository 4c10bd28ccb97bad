"""Reader for the bundled sample (`pipeline/sample/captions.jsonl` + `images/`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.readers import RawRecord

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample"


def default_sample_dir() -> str:
    """The bundled sample folder, relative to the working directory when it lies below it."""
    try:
        return os.path.relpath(SAMPLE_DIR)
    except ValueError:  # another drive on Windows
        return str(SAMPLE_DIR)


def read_sample(root: str | os.PathLike | None = None) -> Iterator[RawRecord]:
    """Yield the sample's pairs (matched and the listed mismatched ones) in file order."""
    root = Path(root) if root is not None else Path(default_sample_dir())
    with open(root / "captions.jsonl", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            yield RawRecord(
                id=str(row.get("id") or f"sample-line-{line_no}"),
                source="sample",
                image_path=str(root / row["image"]),
                caption=row.get("caption"),
                itm=int(row.get("itm", 1)),
            )
