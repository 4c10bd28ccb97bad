"""detect-objects: YOLO boxes (top-K above a confidence) for every prepared image."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.images import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DetectParams:
    batch_size: int = 16  # images per YOLO forward (ultralytics does not batch a list for us)
    imgsz: int = 640
    conf: float = 0.25  # real threshold for `base`; the random `tiny` detector needs ~0.0
    iou: float = 0.7
    top_k: int = 10  # boxes kept per image, by falling confidence
    max_pixels: int = DEFAULT_MAX_PIXELS
    num_workers: int = 0  # DataLoader workers decoding images while YOLO runs

    def recorded(self) -> dict[str, Any]:
        """The parameters that shape the output (worker counts do not)."""
        d = asdict(self)
        d.pop("num_workers")
        return d


class ImageDetector:
    """YOLO loaded once; detects lists of image paths in chunks of `batch_size` (the unit of work
    of every engine: the same chunks give the same boxes)."""

    def __init__(
        self,
        preset: str = "tiny",
        detector_path: str | os.PathLike | None = None,
        params: DetectParams = DetectParams(),
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        from pipeline.models import load_detector
        from pipeline.runtime import select_device, set_threads

        if params.batch_size < 1 or params.top_k < 0:
            raise ValueError("batch_size must be >= 1 and top_k >= 0")
        self.params = params
        set_threads(threads)
        self.dev = select_device(device)
        self.model = load_detector(preset, detector_path)
        self.threads = set_threads(threads)  # importing ultralytics pinned OMP to one thread
        self.names = self.model.names

    def detect(self, paths: list[str], progress: bool = False) -> dict[str, dict[str, Any]]:
        """path -> row (width, height, boxes, classes, confs, error) for distinct image paths."""
        import torch
        from tqdm import tqdm

        from pipeline import labeling_data as data

        p = self.params
        loader = torch.utils.data.DataLoader(
            data.DecodeDataset(paths, p.max_pixels),
            batch_size=p.batch_size,
            shuffle=False,
            num_workers=p.num_workers,
            collate_fn=data.as_list,
        )
        by_path: dict[str, dict[str, Any]] = {}
        bar = tqdm(total=len(paths), desc="detect-objects", unit="img", disable=not progress)
        for chunk in loader:
            good = [(i, arr) for i, arr, _ in chunk if arr is not None]
            for i, _, reason in chunk:
                if reason is not None:
                    by_path[paths[i]] = {"width": 0, "height": 0, "error": reason}
            if good:
                # One explicit batch per chunk: predict() runs a list as a single batch.
                results = self.model.predict(
                    [arr for _, arr in good],
                    imgsz=p.imgsz,
                    conf=p.conf,
                    iou=p.iou,
                    max_det=max(p.top_k, 1),
                    device=str(self.dev),
                    verbose=False,
                )
                for (i, arr), res in zip(good, results, strict=True):
                    by_path[paths[i]] = _result_row(res, arr.shape, self.names, p.top_k)
            bar.update(len(chunk))
        bar.close()
        return by_path


def unique_images(pairs_path: str | os.PathLike) -> tuple[dict[str, list], list[str]]:
    """(pairs columns, distinct image paths in first-seen order): shared images detected once."""
    from pipeline import labeling_data as data

    pairs = data.read_pairs(pairs_path)
    return pairs, list(dict.fromkeys(pairs["image_path"]))


def write_detections(
    pairs: dict[str, list],
    by_path: dict[str, dict[str, Any]],
    out_path: str | os.PathLike,
    preset: str,
    detector_path: str | os.PathLike | None,
    params: DetectParams,
) -> dict[str, Any]:
    """boxes.parquet: one row per pair in pair order; returns the counts of the summary."""
    from pipeline import labeling_data as data
    from pipeline.models import detector_identity

    rows = []
    for sid, path in zip(pairs["id"], pairs["image_path"], strict=True):
        r = by_path[path]
        rows.append(
            {
                "id": sid,
                "width": r["width"],
                "height": r["height"],
                "boxes": r.get("boxes", []),
                "classes": r.get("classes", []),
                "confs": r.get("confs", []),
                "error": r["error"],
            }
        )
    meta = {
        "preset": preset,
        "detector": detector_identity(preset, detector_path),
        "params": params.recorded(),
    }
    data.write_boxes(out_path, rows, meta)
    return {
        "pairs": len(rows),
        "images": len(by_path),
        "boxes": sum(len(r["boxes"]) for r in rows),
        "without_detections": sum(1 for r in rows if not r["boxes"] and not r["error"]),
        "undecodable": sum(1 for r in rows if r["error"]),
    }


def detect_objects(
    pairs_path: str | os.PathLike,
    out_path: str | os.PathLike,
    preset: str = "tiny",
    detector_path: str | os.PathLike | None = None,
    params: DetectParams = DetectParams(),
    device: str = "auto",
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Write data/objects/boxes.parquet: one row per pair (no detections -> empty lists).

    Pairs sharing an image (mismatched ITM pairs) are detected once. Images that fail to decode
    get a row with empty lists and `error` set; label-objects rejects them with that reason.
    `threads` caps torch's threads (default: every core this process may use).
    """
    if params.batch_size < 1 or params.top_k < 0:
        raise ValueError("batch_size must be >= 1 and top_k >= 0")
    pairs, unique_paths = unique_images(pairs_path)
    detector = ImageDetector(preset, detector_path, params, device, threads)
    t0 = time.perf_counter()
    by_path = detector.detect(unique_paths, progress)
    elapsed = time.perf_counter() - t0
    summary = write_detections(pairs, by_path, out_path, preset, detector_path, params)
    summary.update(
        seconds=round(elapsed, 2),
        images_per_s=round(len(unique_paths) / elapsed, 1) if elapsed > 0 else None,
        out=str(Path(out_path)),
    )
    return summary


def _result_row(res: Any, shape: tuple[int, ...], names: dict[int, str], top_k: int) -> dict:
    """Top-k boxes of one ultralytics result, by falling confidence (stable on ties)."""
    import numpy as np

    boxes = res.boxes
    xyxy = boxes.xyxy.float().cpu().numpy()
    conf = boxes.conf.float().cpu().numpy()
    cls = boxes.cls.int().cpu().numpy()
    order = np.argsort(-conf, kind="stable")[:top_k]
    return {
        "width": int(shape[1]),
        "height": int(shape[0]),
        "boxes": [[float(v) for v in xyxy[j]] for j in order],
        "classes": [names[int(cls[j])] for j in order],
        "confs": [float(conf[j]) for j in order],
        "error": None,
    }
