"""The Ray Data engine of detect-objects and label-objects: the same work units, farmed out.

A stage plans as its local engine does, then `run_units` streams a dataset of its work units
through `map_batches` with an actor pool whose actors load their model once: for detection a
unit is a run of whole YOLO chunks of distinct images (`pipeline.detect`), for labeling one
shard (`pipeline.label`). Actors run the local engine's own code on their unit, so boxes and
shards are byte-identical to `--engine local` for the same thread count. Labeling actors write
their shard tar and done-marker straight to the output folder (a killed run resumes from the
markers, as locally); the driver writes boxes.parquet, sizes.json and the manifest. Inputs are
file paths, so every node must see the same filesystem paths, and the project must be installed
on every node.

Ray is an optional extra (`pip install -e ".[ray]"`); only this module imports it.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.settings import RaySettings


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


def _pool(units: int, ray_settings: RaySettings) -> tuple[int, float, float]:
    """(actors, cpus and gpus per actor): by default as many actors as the cluster holds."""
    ray = _ray()
    resources = ray.cluster_resources()
    cpus, gpus = ray_settings.ray_cpus_per_actor, ray_settings.ray_gpus_per_actor
    actors = ray_settings.ray_actors
    if gpus < 0:  # auto: one GPU per actor when the cluster has GPUs
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if actors <= 0:
        by_cpu = int(resources.get("CPU", 1) // max(cpus, 1e-9))
        by_gpu = int(resources.get("GPU", 0) // gpus) if gpus > 0 else by_cpu
        actors = min(by_cpu, by_gpu)
    return max(1, min(actors, units)), cpus, gpus


def _actor_pool(ray: Any, actors: int, cpus: float, gpus: float) -> dict[str, Any]:
    """map_batches' arguments for one unit per call on a fixed pool of actors."""
    return dict(
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )


def _data_context(progress: bool) -> None:
    ctx = _ray().data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.execution_options.preserve_order = True
    ctx.print_on_execution_start = False


def run_units(
    units: list[dict[str, Any]],
    actor: type,
    actor_kwargs: dict[str, Any],
    ray_settings: RaySettings,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every unit through a pool of `actor`s (one unit per call, actors loaded once), in unit
    order; also the pool used (actors, CPUs and GPUs per actor). The actor gets `threads` (its
    CPUs) beside `actor_kwargs`."""
    ray = _ray()
    started = init_ray(ray_settings.ray_address or None)
    try:
        n_actors, cpus, gpus = _pool(len(units), ray_settings)
        _data_context(progress)
        rows: list[dict[str, Any]] = []
        if units:
            ds = ray.data.from_items(units).map_batches(
                actor,
                fn_constructor_kwargs={**actor_kwargs, "threads": max(1, int(cpus))},
                **_actor_pool(ray, n_actors, cpus, gpus),
            )
            rows = list(ds.iter_rows())
    finally:
        if started:
            ray.shutdown()
    return rows, {"actors": n_actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus}
