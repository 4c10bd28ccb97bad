"""Up-front input checks of the CLI commands: each raises a `InputError` saying what to do.

A command calls these before it loads a model or creates an output, so a missing file, an empty
input, stale prompts or a bad parameter stops it at once with one or two readable lines (see
`pmu.errors`). Only light imports here (pyarrow, json); torch only for CUDA device names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pmu.errors import InputError, require_dir, require_file

RUN_PREPARE = "run `pipeline prepare` first (or pass --pairs PATH)"


def pairs_table(path: str | os.PathLike, columns: tuple[str, ...] = ("id",)) -> int:
    """Rows of a prepared pairs.parquet, after checking it exists, reads, has `columns` and
    holds at least one pair."""
    import pyarrow.parquet as pq

    path = require_file(path, "pairs file", RUN_PREPARE)
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise InputError(f"{path} is not a readable parquet file ({exc})", RUN_PREPARE) from exc
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(f"{path} lacks the columns {missing}", "re-run `pipeline prepare`")
    n = pf.metadata.num_rows
    if n == 0:
        rejected = path.parent / "rejected.jsonl"
        raise InputError(
            f"{path} holds no pairs: prepare accepted none of its input",
            f"see why in {rejected}, fix the input and re-run `pipeline prepare`",
        )
    return n


def _json(path: Path, hint: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc})", hint) from exc


VOCAB_HINTS = {
    "entities": "run `pipeline mine-nouns` (on pairs whose captions have nouns)",
    "relations": "run `pipeline fetch-relations`",
}


def vocabulary(path: str | os.PathLike, kind: str) -> int:
    """Size of an entities.json / relations.json (`kind`), which must exist and be non-empty."""
    hint = VOCAB_HINTS[kind]
    path = require_file(path, f"{kind} vocabulary", hint)
    doc = _json(path, hint)
    items = doc.get(kind) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise InputError(f"{path} has no {kind!r} list", hint)
    if not items:
        why = ""
        if kind == "entities" and isinstance(doc.get("n_captions"), int):
            why = f" (mine-nouns found no nouns in {doc['n_captions']} captions)"
        raise InputError(f"empty vocabulary: {path} lists no {kind}{why}", hint)
    return len(items)


def preset(name: str) -> None:
    from pmu.presets import PRESETS

    if name not in PRESETS:
        raise InputError(
            f"unknown preset {name!r}", f"use --preset with one of: {', '.join(sorted(PRESETS))}"
        )


def weights_file(path: str | None, what: str, option: str) -> None:
    """A local weights path given on the command line must exist."""
    if path:
        require_file(path, what, f"pass an existing file with {option}, or leave it out")


def device(name: str) -> None:
    """`auto`, `cpu`, `cuda`, `cuda:N` (checked against the GPUs present) or another torch name."""
    if name in ("auto", "cpu"):
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        hint = "use auto, cpu, cuda or cuda:N"
        raise InputError(f"--device {name!r} is not a device", hint) from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {name}: no CUDA GPU is available here", "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"--device {name}: only {count} CUDA GPU(s) here", "use cuda:0 ...")


def _ids(path: Path):
    """The id column of a parquet file, batch by batch (as Python lists)."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(columns=["id"], batch_size=65536):
        yield from batch.column(0).to_pylist()


def boxes_cover_pairs(boxes_path: str | os.PathLike, pairs_path: str | os.PathLike) -> None:
    """boxes.parquet must have a row for every prepared pair (else it is from other pairs).
    detect-objects writes them in pair order, which is checked streaming; any other order
    falls back to a set of the box ids."""
    import itertools

    hint = "run `pipeline detect-objects` on the current pairs"
    boxes_path = require_file(boxes_path, "detections file", hint)
    try:
        same_order = all(
            a == b for a, b in itertools.zip_longest(_ids(boxes_path), _ids(Path(pairs_path)))
        )
        if same_order:
            return
        box_ids = set(_ids(boxes_path))
    except Exception as exc:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise InputError(f"{boxes_path} is not a readable boxes.parquet ({exc})", hint) from exc
    n_pairs, missing, first = 0, 0, None
    for pair_id in _ids(Path(pairs_path)):
        n_pairs += 1
        if pair_id not in box_ids:
            missing += 1
            first = pair_id if first is None else first
    if missing:
        raise InputError(
            f"{boxes_path} lacks {missing} of the {n_pairs} prepared pairs "
            f"(e.g. {first!r}): it was made from other pairs",
            hint,
        )


def shard_folder(path: str | os.PathLike) -> Path:
    """A folder that holds shards (or at least their sizes.json) from label-objects."""
    from pmu import shards

    hint = "run `pipeline label-objects` first, or pass the folder it wrote (--out)"
    root = require_dir(path, "shard folder", hint)
    if not shards.shard_paths(root) and not (root / shards.SIZES_FILE).exists():
        raise InputError(f"no shards in {root} (no shard-*.tar, no sizes.json)", hint)
    return root


def readable_shard_folder(path: str | os.PathLike) -> Path:
    """For reading the shards (inspect): the vocabularies must be there as well."""
    from pmu import shards

    root = shard_folder(path)
    if not shards.shard_paths(root):
        raise InputError(
            f"no shard-*.tar in {root} (sizes.json lists {len(_sizes(root))})",
            "re-run `pipeline label-objects`; `pipeline verify` lists what is missing",
        )
    for name in (shards.ENTITIES_FILE, shards.RELATIONS_FILE):
        require_file(
            root / name, "vocabulary", "re-run `pipeline label-objects` (it writes both files)"
        )
    return root


def _sizes(root: Path) -> dict:
    try:
        sizes = json.loads((root / "sizes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return sizes if isinstance(sizes, dict) else {}
