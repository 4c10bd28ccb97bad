"""Reader for NewsCLIPpings annotations resolved against a VisualNews `data.json` and image root.

NewsCLIPpings (Luo et al., 2021) annotation files look like
`{"annotations": [{"id": 123, "image_id": 456, "falsified": true, ...}, ...]}`: `id` names the
VisualNews item whose caption is used, `image_id` the item whose image is used. VisualNews'
`data.json` is a list of `{"id", "image_path", "caption", ...}` with `image_path` relative to the
dataset root (e.g. `./bbc/images/0001/123.jpg`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.readers.records import RawRecord, image_under_root
from pmu.errors import InputError


def _load_json(path: str | os.PathLike, what: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON ({exc})", "check the file") from exc


def load_visualnews(data_json: str | os.PathLike) -> dict[str, dict]:
    """VisualNews items by id (as strings, since annotation files mix ints and strings)."""
    items = _load_json(data_json, "VisualNews data")
    if isinstance(items, dict):  # some re-distributions key the items by id
        items = [dict(v, id=v.get("id", k)) for k, v in items.items() if isinstance(v, dict)]
    if not isinstance(items, list):
        raise InputError(
            f"{data_json} is not a list of VisualNews items", "check --visualnews-data"
        )
    return {str(item["id"]): item for item in items if isinstance(item, dict) and "id" in item}


FALSIFIED_NOT_BOOL = "newsclippings: falsified must be true or false"


def _itm(falsified: object) -> tuple[int, str | None]:
    """(itm, problem) from the `falsified` flag: a JSON boolean only (missing: matched). Text
    such as "false" is refused, not read by truthiness (which would make it a mismatch)."""
    if falsified is None:
        return 1, None
    if isinstance(falsified, bool):
        return (0 if falsified else 1), None
    return 1, f"{FALSIFIED_NOT_BOOL} ({falsified!r})"


def read_newsclippings(
    annotations: str | os.PathLike,
    visualnews_data: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> Iterator[RawRecord]:
    """Yield one record per annotation; `falsified` pairs get itm 0. Image paths join the root
    and may not leave it (unless allowed)."""
    items = load_visualnews(visualnews_data)
    root = Path(image_root) if image_root is not None else Path(visualnews_data).parent
    doc = _load_json(annotations, "NewsCLIPpings annotations")
    rows = doc.get("annotations") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise InputError(
            f"{annotations} has no list of annotations", "pass a NewsCLIPpings annotation JSON"
        )
    for n, ann in enumerate(rows):
        if not isinstance(ann, dict):
            problem = "newsclippings: annotation is not an object"
            yield RawRecord(f"ncp-row-{n}", "newsclippings", None, None, problem=problem)
            continue
        cap_id, img_id = str(ann.get("id", "")), str(ann.get("image_id", ""))
        rec_id = f"ncp-{cap_id}-{img_id}" if cap_id and img_id else f"ncp-row-{n}"
        itm, problem = _itm(ann.get("falsified"))
        cap_item, img_item = items.get(cap_id), items.get(img_id)
        if cap_item is None:
            problem = problem or "newsclippings: caption id not in data.json"
        elif img_item is None:
            problem = problem or "newsclippings: image id not in data.json"
        image_path = None
        if img_item is not None and img_item.get("image_path"):
            rel = str(img_item["image_path"]).removeprefix("./")
            image_path, outside = image_under_root(rel, root, allow_outside_root)
            problem = problem or outside
        yield RawRecord(
            id=rec_id,
            source="newsclippings",
            image_path=image_path,
            caption=cap_item.get("caption") if cap_item else None,
            itm=itm,
            problem=problem,
        )
