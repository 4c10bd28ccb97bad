"""The truth file of an annotated image set (`truth.jsonl`, written by `pipeline synth-world`):
one JSON object per image with its `image` (relative to the file's folder), `boxes` (xyxy in
pixels), `classes` (one per box) and optionally its `relation` and `caption`. One reader with
one set of checks, for adapt-teacher, score-labels and the student ViT's start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pmu.errors import InputError

HINT = "each line needs image, boxes (xyxy) and as many classes (docs/world.md)"


def read_truth(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a truth.jsonl, `image` resolved against the file's folder; an InputError
    naming the line when one is not valid."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n}: not JSON ({exc})", HINT) from None
            problem = _problem(row)
            if problem:
                raise InputError(f"{path}:{n}: {problem}", HINT)
            rows.append({**row, "image": str(path.parent / row["image"])})
    if not rows:
        raise InputError(f"{path}: no annotated images", HINT)
    return rows


def _problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    for key in ("image", "boxes", "classes"):
        if key not in row:
            return f"no {key!r}"
    if not isinstance(row["image"], str) or not row["image"]:
        return "'image' is not a path"
    boxes, classes = row["boxes"], row["classes"]
    if not isinstance(boxes, list) or not isinstance(classes, list):
        return "'boxes' and 'classes' must be lists"
    if len(boxes) != len(classes):
        return f"{len(boxes)} boxes but {len(classes)} classes"
    for box in boxes:
        if not (isinstance(box, list) and len(box) == 4):
            return f"box {box!r} is not [x0, y0, x1, y1]"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            return f"box {box!r} holds a value that is not a number"
    if not all(isinstance(c, str) for c in classes):
        return "'classes' must be names"
    return None


def truth_by_image(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Resolved real image path -> truth row."""
    return {os.path.realpath(row["image"]): row for row in read_truth(path)}
