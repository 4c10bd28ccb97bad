"""detect-objects: YOLO boxes (top-K above a confidence) for every prepared image."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.settings import DetectSettings

# What the DataLoader workers import (the forkserver imports it once; see pmu.runtime).
WORKER_MODULES = ("pipeline.labeling_data", "pipeline.yolo_batch", "cv2")


class ImageDetector:
    """YOLO loaded once; detects lists of image paths in chunks of `batch_size` (the unit of work
    of every engine: the same chunks give the same boxes).

    `impl="fast"`: workers decode and letterbox into uint8 batches, the fused raw model runs on
    the batch (bf16 autocast on CUDA, fp32 on CPU), NMS and box scaling run batched on the
    device (`pipeline.yolo_batch`). `impl="ultralytics"`: `YOLO.predict` per chunk (reference).
    """

    def __init__(self, settings: DetectSettings, threads: int | None = None) -> None:
        from pipeline.models import load_detector
        from pmu.runtime import (
            auto_workers,
            keep_freed_memory,
            select_device,
            set_threads,
            start_worker_server,
        )

        params = settings.params
        params.check()
        keep_freed_memory()  # batches reuse heap pages, no mmap + munmap (PMU_MALLOC=system: off)
        self.params = params
        set_threads(threads)
        self.dev = select_device(settings.device)
        self.num_workers = auto_workers(params.num_workers, self.dev, cpu_default=0)
        if self.num_workers > 0:
            start_worker_server(WORKER_MODULES)  # the workers' server imports while the model loads
        self.model = load_detector(settings.preset, settings.detector)
        self.threads = set_threads(threads)  # importing ultralytics pinned OMP to one thread
        self.names = self.model.names
        self.bytes_to_device = 0  # host -> device traffic of the batches (benchmark proxy)
        if params.impl == "fast":
            import torchvision  # noqa: F401 - NMS; imported here, not inside the first batch
            from ultralytics.utils.checks import check_imgsz

            from pipeline.yolo_batch import fused_network

            self.net, self.stride = fused_network(self.model, self.dev)
            self.new_shape = tuple(check_imgsz(params.imgsz, stride=self.stride, min_dim=2))
            # One NMS call per image on CPU (cheapest there); bounded multi-image calls on CUDA.
            self.nms_group_boxes = 0 if self.dev.type == "cpu" else 16384

    def detect(self, paths: list[str], progress: bool = False) -> dict[str, dict[str, Any]]:
        """path -> row (width, height, boxes, classes, confs, error) for distinct image paths."""
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="detect-objects", unit="img", disable=not progress)
        try:
            if self.params.impl == "fast":
                return self._detect_fast(paths, bar)
            return self._detect_ultralytics(paths, bar)
        finally:
            bar.close()

    def _detect_fast(self, paths: list[str], bar: Any) -> dict[str, dict[str, Any]]:
        import torch

        from pipeline import yolo_batch
        from pmu.runtime import autocast, worker_context

        p = self.params
        loader = torch.utils.data.DataLoader(
            yolo_batch.LetterboxDataset(paths, p.max_pixels, self.new_shape),
            batch_size=p.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=yolo_batch.LetterboxCollate(self.new_shape, self.stride),
            pin_memory=self.dev.type == "cuda",
            multiprocessing_context=worker_context(self.num_workers, WORKER_MODULES),
        )
        by_path: dict[str, dict[str, Any]] = {}
        with torch.inference_mode():
            for batch in loader:
                for i, reason in batch["rejected"]:
                    by_path[paths[i]] = {"width": 0, "height": 0, "error": reason}
                if batch["index"]:
                    pixels = batch["pixels"]
                    self.bytes_to_device += pixels.numel()
                    x = yolo_batch.to_model_input(pixels.to(self.dev, non_blocking=True))
                    with autocast(self.dev):
                        preds = self.net(x)
                    image, xyxy, conf, cls = yolo_batch.postprocess(
                        preds,
                        batch["orig_hw"],
                        tuple(x.shape[2:]),
                        p.conf,
                        p.iou,
                        p.top_k,
                        p.pre_nms_top_k,
                        self.nms_group_boxes,
                    )
                    by_path.update(_rows_of_batch(batch, paths, image, xyxy, conf, cls, self.names))
                bar.update(len(batch["index"]) + len(batch["rejected"]))
        return by_path

    def _detect_ultralytics(self, paths: list[str], bar: Any) -> dict[str, dict[str, Any]]:
        import torch

        from pipeline import labeling_data as data
        from pmu.runtime import worker_context

        p = self.params
        loader = torch.utils.data.DataLoader(
            data.DecodeDataset(paths, p.max_pixels),
            batch_size=p.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=data.as_list,
            multiprocessing_context=worker_context(self.num_workers, WORKER_MODULES),
        )
        by_path: dict[str, dict[str, Any]] = {}
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
        return by_path


def unique_images(pairs_path: str | os.PathLike) -> tuple[dict[str, list], list[str]]:
    """(pairs columns, distinct image paths in first-seen order): shared images detected once."""
    from pipeline import labeling_data as data

    pairs = data.read_pairs(pairs_path)
    return pairs, list(dict.fromkeys(pairs["image_path"]))


def write_detections(
    pairs: dict[str, list], by_path: dict[str, dict[str, Any]], settings: DetectSettings
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
        "preset": settings.preset,
        "detector": detector_identity(settings.preset, settings.detector),
        "params": settings.params.recorded(),
    }
    data.write_boxes(settings.out, rows, meta)
    return {
        "pairs": len(rows),
        "images": len(by_path),
        "boxes": sum(len(r["boxes"]) for r in rows),
        "without_detections": sum(1 for r in rows if not r["boxes"] and not r["error"]),
        "undecodable": sum(1 for r in rows if r["error"]),
    }


def detect_objects(
    settings: DetectSettings, *, progress: bool = True, threads: int | None = None
) -> dict[str, Any]:
    """Write data/objects/boxes.parquet in this process (the local engine; the other is
    `pipeline.ray_engine.detect_objects_ray`): one row per pair (no detections: empty lists).

    Pairs sharing an image (mismatched ITM pairs) are detected once. Images that fail to decode
    get a row with empty lists and `error` set; label-objects rejects them with that reason.
    `threads` caps torch's threads (default: every core this process may use).
    """
    settings.params.check()
    pairs, unique_paths = unique_images(settings.pairs)
    detector = ImageDetector(settings, threads)
    t0 = time.perf_counter()
    by_path = detector.detect(unique_paths, progress)
    elapsed = time.perf_counter() - t0
    summary = write_detections(pairs, by_path, settings)
    summary.update(
        seconds=round(elapsed, 2),
        images_per_s=round(len(unique_paths) / elapsed, 1) if elapsed > 0 else None,
        out=str(Path(settings.out)),
    )
    return summary


class _DetectActor:
    """Ray: holds one YOLO; maps a batch of units (lists of image paths) to JSON rows per path."""

    def __init__(self, settings: DetectSettings, threads: int) -> None:
        self.detector = ImageDetector(settings, threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import json

        import numpy as np

        rows = [json.dumps(self.detector.detect(json.loads(p)), sort_keys=True)
                for p in batch["paths"]]  # fmt: skip
        return {"unit": batch["unit"], "rows": np.array(rows, dtype=object)}


def detect_objects_ray(
    settings: DetectSettings, *, progress: bool = True, chunks_per_task: int = 8
) -> dict[str, Any]:
    """detect-objects on Ray Data (`pipeline.ray_engine`): the same boxes.parquet bytes as the
    local engine. A unit is `chunks_per_task` whole YOLO chunks (`params.batch_size` images each)
    of the distinct images in first-seen order, so every image is detected in the same chunk as
    locally."""
    import json

    from pipeline.ray_engine import run_units

    settings.params.check()
    pairs, paths = unique_images(settings.pairs)
    step = settings.params.batch_size * max(1, chunks_per_task)
    units = [
        {"unit": u, "paths": json.dumps(paths[start : start + step])}
        for u, start in enumerate(range(0, len(paths), step))
    ]
    t0 = time.perf_counter()
    rows, pool = run_units(units, _DetectActor, {"settings": settings}, settings.ray, progress)
    elapsed = time.perf_counter() - t0
    by_path: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_path.update(json.loads(row["rows"]))
    summary = write_detections(pairs, by_path, settings)
    summary.update(
        seconds=round(elapsed, 2),
        images_per_s=round(len(paths) / elapsed, 1) if elapsed > 0 else None,
        out=str(Path(settings.out)),
        engine="ray",
        actors=pool["actors"],
    )
    return summary


def run_stage(settings: DetectSettings, *, progress: bool = True) -> str:
    """detect-objects as the command runs it: checks, then the engine; returns what it prints."""
    from pipeline import checks

    checks.pairs_table(settings.pairs, ("id", "image_path"))
    checks.preset(settings.preset)
    checks.weights_file(settings.detector, "detector weights", "--detector")
    checks.device(settings.device)
    settings.params.check()
    if settings.engine == "ray":
        s = detect_objects_ray(settings, progress=progress)
    else:
        s = detect_objects(settings, progress=progress)
    return (
        f"detect-objects: {s['pairs']} pairs ({s['images']} distinct images), {s['boxes']} boxes, "
        f"{s['without_detections']} without detections, {s['undecodable']} undecodable; "
        f"{s['seconds']} s ({s['images_per_s']} img/s) -> {s['out']}"
    )


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


def _rows_of_batch(
    batch: dict[str, Any],
    paths: list[str],
    image: Any,
    xyxy: Any,
    conf: Any,
    cls: Any,
    names: dict[int, str],
) -> dict[str, dict[str, Any]]:
    """Rows of one fast-path batch from its detections (sorted by image, falling confidence):
    one device -> host copy per tensor."""
    image, xyxy, conf, cls = (t.cpu().tolist() for t in (image, xyxy, conf.float(), cls))
    hw = batch["orig_hw"].tolist()
    rows = {
        paths[i]: {
            "width": int(w),
            "height": int(h),
            "boxes": [],
            "classes": [],
            "confs": [],
            "error": None,
        }
        for i, (h, w) in zip(batch["index"], hw, strict=True)
    }
    for b, box, c, k in zip(image, xyxy, conf, cls, strict=True):
        row = rows[paths[batch["index"][b]]]
        row["boxes"].append(box)
        row["classes"].append(names[int(k)])
        row["confs"].append(c)
    return rows
