"""Reader for a world folder from `pipeline synth-world`: its `pairs.jsonl` (corpus or adapt)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.readers.records import RawRecord
from pipeline.readers.tabular import read_table
from pmu.errors import InputError

PAIRS_FILE = "pairs.jsonl"
DEFAULT_SPLIT = "corpus"


def world_pairs_path(input_path: str | os.PathLike) -> Path:
    """The pairs.jsonl to read: a world root means its corpus; a split folder (`corpus/`,
    `adapt/`) or a pairs.jsonl itself is taken as given."""
    path = Path(input_path)
    for candidate in (path, path / PAIRS_FILE, path / DEFAULT_SPLIT / PAIRS_FILE):
        if candidate.is_file():
            return candidate
    raise InputError(
        f"{path} is neither a world folder (with {DEFAULT_SPLIT}/{PAIRS_FILE}) nor a split "
        f"folder with {PAIRS_FILE}",
        "build one with `pipeline synth-world --out DIR`",
    )


def read_world(
    input_path: str | os.PathLike, allow_outside_root: bool = False
) -> Iterator[RawRecord]:
    """Yield the split's pairs (matched and mismatched) in file order; image paths resolve
    against the split folder. Bad rows come back as records with a `problem`."""
    path = world_pairs_path(input_path)
    return read_table(
        path, image_root=path.parent, source="world", allow_outside_root=allow_outside_root
    )
