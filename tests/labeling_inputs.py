"""Small, contract-true inputs of the labeling stages (pairs.parquet, vocabularies) for tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.prepare import Pair, write_pairs_parquet

ENTITIES = ["man", "dog", "car", "tree", "house", "ball", "woman", "city", "boat", "flag"]
RELATIONS = [
    ("P31", "instance of"),
    ("P17", "country"),
    ("P131", "located in the administrative territorial entity"),
    ("P27", "country of citizenship"),
    ("P39", "position held"),
]


def _image(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A picture with a few coloured rectangles (something for a detector to look at)."""
    pixels = np.full((height, width, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        pixels[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_labeling_inputs(
    root: Path, n: int = 10, broken: tuple[int, ...] = (), seed: int = 0
) -> dict[str, Path]:
    """pairs.parquet (+ rejected.jsonl), images, entities.json, relations.json under `root`.

    Images at the positions in `broken` are truncated after prepare (label-stage rejections).
    Every fourth pair is a mismatched pair re-using the previous image (as prepare makes them).
    """
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if i % 4 == 3:
            prev = rows[-1]
            rows.append(dict(prev, id=f"pair-{i:04d}", itm=0, caption=f"mismatched caption {i}"))
            continue
        width, height = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        path = img_dir / f"img{i:04d}.jpg"
        data = _image(rng, width, height)
        path.write_bytes(data[: len(data) // 3] if i in broken else data)
        rows.append(
            {
                "id": f"pair-{i:04d}",
                "source": "test",
                "image_path": str(path),
                "caption": f"a man and a dog near a car, picture {i}",
                "itm": 1,
                "width": width,
                "height": height,
            }
        )
    paths = {
        "pairs": root / "prepared" / "pairs.parquet",
        "rejected": root / "prepared" / "rejected.jsonl",
        "entities": root / "vocab" / "entities.json",
        "relations": root / "vocab" / "relations.json",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_pairs_parquet([Pair(**row) for row in rows], paths["pairs"])  # the stage's writer
    paths["rejected"].write_text(
        json.dumps(
            {"id": "gone-1", "source": "test", "stage": "prepare", "reason": "caption: empty"}
        )
        + "\n",
        encoding="utf-8",
    )
    paths["entities"].write_text(
        json.dumps(
            {
                "source": "test",
                "m": len(ENTITIES),
                "n_captions": n,
                "entities": [{"name": e, "count": 10 - j} for j, e in enumerate(ENTITIES)],
            }
        ),
        encoding="utf-8",
    )
    paths["relations"].write_text(
        json.dumps(
            {
                "source": "snapshot",
                "l": len(RELATIONS),
                "relations": [{"pid": p, "label": lab} for p, lab in RELATIONS],
            }
        ),
        encoding="utf-8",
    )
    return paths


def write_label_stage_inputs(root: Path, n: int = 4) -> dict[str, Path]:
    """Everything `pipeline label-objects` reads, for `n` pairs: the inputs above, one crafted
    box per image (objects/boxes.parquet) and the tiny CLIP's prompts (vocab/)."""
    from pipeline.labeling_data import read_pairs, write_boxes
    from pipeline.prompts import embed_prompts

    paths = write_labeling_inputs(root, n=n)
    pairs = read_pairs(paths["pairs"])
    rows = [
        {"id": i, "width": w, "height": h, "boxes": [[1.0, 1.0, w / 2, h / 2]]}
        | {"classes": ["dog"], "confs": [0.9], "error": None}
        for i, w, h in zip(pairs["id"], pairs["width"], pairs["height"], strict=True)
    ]
    paths["boxes"] = root / "objects" / "boxes.parquet"
    paths["boxes"].parent.mkdir(parents=True, exist_ok=True)
    write_boxes(paths["boxes"], rows, {"preset": "test", "detector": {}, "params": {}})
    paths["prompts"] = root / "vocab" / "prompts.safetensors"
    embed_prompts(paths["entities"], paths["relations"], paths["prompts"])
    return paths
