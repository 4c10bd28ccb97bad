"""The Ray Data engine of detect-objects and label-objects: the same work units, farmed out.

The driver plans as the local engine does (pipeline.detect / pipeline.label), then streams a
dataset of work units through `map_batches` with an actor pool whose actors load their model
once: for detection a unit is a run of whole YOLO chunks of distinct images, for labeling it is
one shard. Actors run the local engine's own code on their unit (`ImageDetector.detect`,
`ShardLabeler.label`), so boxes and shards are byte-identical to `--engine local` for the same
thread count. Labeling actors write their shard tar and done-marker straight to the output folder
(a killed run resumes from the markers, as locally); the driver writes boxes.parquet, sizes.json
and the manifest. Inputs are file paths, so every node must see the same filesystem paths, and
the project must be installed on every node.

Ray is an optional extra (`pip install -e ".[ray]"`); only this module imports it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.detect import DetectParams
from pipeline.label import LabelParams

ENGINES = ("local", "ray")


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise RuntimeError(
            "--engine ray needs Ray: pip install -e '.[ray]' (or use --engine local)"
        ) from e
    return ray


def init_ray(address: str | None = None) -> bool:
    """Connect to a cluster (`address` or RAY_ADDRESS) or start a local one; True if started here.

    An already initialised Ray (e.g. by a test or a notebook) is used as it is.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return True


def _pool(units: int, cpus: float, gpus: float, actors: int) -> tuple[int, float, float]:
    """(actors, cpus and gpus per actor): by default as many actors as the cluster holds."""
    ray = _ray()
    resources = ray.cluster_resources()
    if gpus < 0:  # auto: one GPU per actor when the cluster has GPUs
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if actors <= 0:
        by_cpu = int(resources.get("CPU", 1) // max(cpus, 1e-9))
        by_gpu = int(resources.get("GPU", 0) // gpus) if gpus > 0 else by_cpu
        actors = min(by_cpu, by_gpu)
    return max(1, min(actors, units)), cpus, gpus


def _data_context(progress: bool) -> None:
    ctx = _ray().data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.execution_options.preserve_order = True
    ctx.print_on_execution_start = False


# ----------------------------------------------------------------------------- detect-objects


class _DetectActor:
    """Holds one YOLO; maps a batch of units (lists of image paths) to JSON rows per path."""

    def __init__(self, preset, detector_path, params, device, threads):
        from pipeline.detect import ImageDetector

        self.detector = ImageDetector(preset, detector_path, params, device, threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = []
        for paths_json in batch["paths"]:
            by_path = self.detector.detect(json.loads(paths_json))
            rows.append(json.dumps(by_path, sort_keys=True))
        return {"unit": batch["unit"], "rows": np.array(rows, dtype=object)}


def detect_objects_ray(
    pairs_path: str | os.PathLike,
    out_path: str | os.PathLike,
    preset: str = "tiny",
    detector_path: str | os.PathLike | None = None,
    params: DetectParams = DetectParams(),
    device: str = "auto",
    progress: bool = True,
    address: str | None = None,
    actors: int = 0,
    cpus_per_actor: float = 2,
    gpus_per_actor: float = -1,
    chunks_per_task: int = 8,
) -> dict[str, Any]:
    """detect-objects on Ray Data: the same boxes.parquet bytes as the local engine.

    A unit is `chunks_per_task` whole YOLO chunks (`params.batch_size` images each) of the
    distinct images in first-seen order, so every image is detected in the same chunk as locally.
    """
    from pipeline.detect import unique_images, write_detections

    params.check()
    ray = _ray()
    started = init_ray(address)
    try:
        pairs, paths = unique_images(pairs_path)
        step = params.batch_size * max(1, chunks_per_task)
        units = [
            {"unit": u, "paths": json.dumps(paths[start : start + step])}
            for u, start in enumerate(range(0, len(paths), step))
        ]
        n_actors, cpus, gpus = _pool(len(units), cpus_per_actor, gpus_per_actor, actors)
        _data_context(progress)
        t0 = time.perf_counter()
        by_path: dict[str, dict[str, Any]] = {}
        if units:
            ds = ray.data.from_items(units).map_batches(
                _DetectActor,
                fn_constructor_kwargs=dict(
                    preset=preset,
                    detector_path=str(detector_path) if detector_path else None,
                    params=params,
                    device=device,
                    threads=max(1, int(cpus)),
                ),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=n_actors),
                num_cpus=cpus,
                num_gpus=gpus,
            )
            for row in ds.iter_rows():
                by_path.update(json.loads(row["rows"]))
        elapsed = time.perf_counter() - t0
        summary = write_detections(pairs, by_path, out_path, preset, detector_path, params)
    finally:
        if started:
            ray.shutdown()
    summary.update(
        seconds=round(elapsed, 2),
        images_per_s=round(len(paths) / elapsed, 1) if elapsed > 0 else None,
        out=str(Path(out_path)),
        engine="ray",
        actors=n_actors,
    )
    return summary


# ----------------------------------------------------------------------------- label-objects


class _LabelActor:
    """Holds one CLIP (`ShardLabeler`); labels the shards it is given and writes them."""

    def __init__(self, job, device, threads):
        from pipeline.label import ShardLabeler

        self.labeler = ShardLabeler(job, device, threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        shard_ids = [int(s) for s in batch["shard"]]
        markers = dict(self.labeler.label(shard_ids))
        return {
            "shard": np.array(shard_ids, dtype=np.int64),
            "marker": np.array([json.dumps(markers[s]) for s in shard_ids], dtype=object),
        }


def label_objects_ray(
    pairs_path: str | os.PathLike,
    boxes_path: str | os.PathLike,
    prompts_path: str | os.PathLike,
    entities_path: str | os.PathLike,
    relations_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    clip_path: str | os.PathLike | None = None,
    params: LabelParams = LabelParams(),
    device: str = "auto",
    prepare_rejected_path: str | os.PathLike | None = None,
    stats_path: str | os.PathLike | None = None,
    stage_params: dict[str, Any] | None = None,
    progress: bool = True,
    counts_path: str | os.PathLike | None = None,
    address: str | None = None,
    actors: int = 0,
    cpus_per_actor: float = 2,
    gpus_per_actor: float = -1,
) -> dict[str, Any]:
    """label-objects on Ray Data, one shard per task: the same shard folder bytes as locally."""
    from pipeline.label import finish_labeling, plan_labeling, write_stats

    ray = _ray()
    t_start = time.perf_counter()
    job, done = plan_labeling(
        pairs_path,
        boxes_path,
        prompts_path,
        entities_path,
        relations_path,
        out_dir,
        preset,
        clip_path,
        params,
    )
    todo = [s for s in range(job.n_shards) if s not in done]
    started = init_ray(address)
    try:
        n_actors, cpus, gpus = _pool(len(todo), cpus_per_actor, gpus_per_actor, actors)
        _data_context(progress)
        t_loop = time.perf_counter()
        if todo:
            ds = ray.data.from_items([{"shard": s} for s in todo]).map_batches(
                _LabelActor,
                fn_constructor_kwargs=dict(job=job, device=device, threads=max(1, int(cpus))),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=n_actors),
                num_cpus=cpus,
                num_gpus=gpus,
            )
            for row in ds.iter_rows():
                done[int(row["shard"])] = json.loads(row["marker"])
        loop_seconds = time.perf_counter() - t_loop
    finally:
        if started:
            ray.shutdown()
    images = sum(job.shard_range(s)[1] - job.shard_range(s)[0] for s in todo)
    summary = finish_labeling(
        job, done, entities_path, relations_path, prepare_rejected_path, stage_params
    )
    summary["timing"] = {
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "seconds_loop": round(loop_seconds, 3),
        "images_labelled_this_run": images,
        "images_per_s": round(images / loop_seconds, 2) if loop_seconds > 0 else None,
        "shards_resumed": job.n_shards - len(todo),
        "device": device,
        "num_workers": params.num_workers,
        "engine": "ray",
        "actors": n_actors,
        "cpus_per_actor": cpus,
        "gpus_per_actor": gpus,
    }
    write_stats(stats_path, summary, counts_path)
    return summary
