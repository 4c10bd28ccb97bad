"""The object boxes the fusion's crops come from at fine-tuning (`--crops N --detector W`):
the detector run once over every image of the three splits, cached beside the run.

Pretraining reads its boxes from the shards; fine-tuning images come without any, so the same
detector that labelled the corpus (detect-objects) finds the top `N` by confidence here. The
cache (`OUT/boxes.json`) is keyed by the detector's weights and settings: another detector or
threshold detects again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pmu.errors import InputError
from pmu.io import file_sha256, write_json_atomic

BOXES_FILE = "boxes.json"


def detector_key(cfg: Any, n_crops: int) -> str:
    """What decides the boxes: the weights, their preset, input size, threshold and count."""
    weights = file_sha256(cfg.detector) if Path(cfg.detector).is_file() else cfg.detector
    parts = [weights, cfg.detector_preset, cfg.detector_imgsz, cfg.detector_conf, n_crops]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def image_boxes(cfg: Any, n_crops: int, paths: list[str], out_dir: Path) -> dict[str, list]:
    """image path -> up to `n_crops` boxes (normalised xyxy, by falling confidence)."""
    if not cfg.detector:
        raise InputError(
            f"--crops {n_crops} needs boxes: pass --detector WEIGHTS (the detector that labelled "
            "the corpus, e.g. models/detector.safetensors)",
            "or --crops 0 for the whole image only",
        )
    key = detector_key(cfg, n_crops)
    cache = out_dir / BOXES_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key and set(paths) <= set(saved["boxes"]):
            return saved["boxes"]
    from pipeline.detect import ImageDetector
    from pipeline.settings import DetectParams, DetectSettings

    params = DetectParams(
        imgsz=cfg.detector_imgsz, conf=cfg.detector_conf, top_k=n_crops, num_workers=0
    )
    settings = DetectSettings(
        preset=cfg.detector_preset, detector=cfg.detector, device=cfg.device, params=params
    )
    rows = ImageDetector(settings, cfg.threads).detect(sorted(paths))
    boxes = {
        path: [
            [x0 / r["width"], y0 / r["height"], x1 / r["width"], y1 / r["height"]]
            for x0, y0, x1, y1 in r.get("boxes", [])
        ]
        for path, r in rows.items()
    }
    write_json_atomic(cache, {"key": key, "boxes": boxes})
    return boxes
