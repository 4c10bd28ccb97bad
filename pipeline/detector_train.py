"""train-detector: fine-tune YOLO with ultralytics' own trainer on a YOLO-format dataset.

A source with boxes (the synthetic world writes `yolo/data.yaml`, docs/world.md) gives the
detector that detect-objects then uses (`models.detector` / `--detector`). Training starts from
the preset's detector (tiny/small: `yolo11n.yaml` built with the project's seed; base:
`yolo11n.pt`) or a local checkpoint, runs in `{out}.runs/` (resumable: `--resume` continues
from its last.pt), writes the best epoch to `out` and reports mAP50 and recall on the held-out
`val` images. `out` ending in .safetensors (the default) holds weights, architecture and class
names without pickle (pipeline.models.load_detector reads it); .pt copies ultralytics'
checkpoint (a pickle: load only ones you made).

The dataset folder is only read: ultralytics' label-scan caches (`labels/*.cache`, which it
would write beside the labels and later load with numpy's pickle) are neither written nor
read (`no_label_caches`), so a DVC output stays unchanged and a dataset from elsewhere cannot
run code through a planted cache file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.settings import DetectorTrainParams, TrainDetectorSettings
from pmu.errors import InputError
from pmu.io import atomic_path

# ultralytics' logging integrations: each is switched off for this process while training (the
# DVC one would open dvclive in the working directory and rewrite the project's dvc.yaml).
INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard", "wandb")


@contextlib.contextmanager
def no_integrations():
    """Switch ultralytics' logging integrations off in memory only (the user's settings file,
    which `SETTINGS[...] = ...` would rewrite, stays as it is)."""
    from ultralytics.utils import SETTINGS

    saved = {k: SETTINGS[k] for k in INTEGRATIONS if k in SETTINGS}
    for k in saved:
        dict.__setitem__(SETTINGS, k, False)
    try:
        yield
    finally:
        for k, v in saved.items():
            dict.__setitem__(SETTINGS, k, v)


@contextlib.contextmanager
def no_label_caches():
    """Keep ultralytics from reading or writing `labels/*.cache` files for this block.

    Its YOLO datasets load that file with `np.load(allow_pickle=True)` (unpickling whatever a
    dataset ships) and write it into the dataset folder (modifying a DVC-tracked output). Here
    loading always fails, so the labels are rescanned (seconds for thousands of images), and
    saving does nothing."""
    import ultralytics.data.dataset as ds

    def refuse_load(path):
        raise FileNotFoundError(f"{path}: label caches are not read (pickle)")

    def skip_save(prefix, path, x, version):
        x["version"] = version  # what the real one adds in place (its callers pop it)

    saved = ds.load_dataset_cache_file, ds.save_dataset_cache_file
    ds.load_dataset_cache_file, ds.save_dataset_cache_file = refuse_load, skip_save
    try:
        yield
    finally:
        ds.load_dataset_cache_file, ds.save_dataset_cache_file = saved


def _read_names(data_yaml: Path) -> dict[int, str]:
    import yaml

    doc = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    for key in ("train", "val", "names"):
        if key not in (doc or {}):
            raise InputError(
                f"{data_yaml}: no {key!r}", "a YOLO dataset yaml needs train, val and names"
            )
    names = doc["names"]
    return (
        dict(enumerate(names)) if isinstance(names, list) else {int(k): v for k, v in names.items()}
    )


def _train_args(params: DetectorTrainParams, data_yaml: Path, runs: Path, dev: Any) -> dict:
    """ultralytics' `train` arguments for these parameters."""
    return dict(
        data=str(data_yaml),
        epochs=params.epochs,
        imgsz=params.imgsz,
        batch=params.batch,
        workers=params.workers,
        patience=params.patience or params.epochs,
        seed=params.seed,
        deterministic=True,
        optimizer=params.optimizer,
        lr0=params.lr0,
        warmup_epochs=params.warmup_epochs,
        mosaic=params.mosaic,
        cache="ram" if params.cache else False,
        device="cpu" if dev.type == "cpu" else str(dev.index or 0),
        project=str(runs),
        name="train",
        exist_ok=True,
        plots=False,  # plotting fetches a font from the network
        amp=dev.type == "cuda",
        verbose=False,
    )


def _save_best(best: Path, out: Path) -> None:
    """The best weights at `out`: .safetensors (no pickle for whoever loads it) or ultralytics'
    own .pt."""
    if not best.is_file():
        raise RuntimeError(f"ultralytics wrote no {best}: see the log above")
    if out.suffix == ".safetensors":
        from ultralytics import YOLO

        from pipeline.models import save_detector_safetensors

        save_detector_safetensors(YOLO(str(best)), out)
    else:
        with atomic_path(out) as tmp:
            shutil.copyfile(best, tmp)


def train_detector(settings: TrainDetectorSettings, *, threads: int | None = None) -> dict:
    """Train, copy the best weights to `settings.out`, write `{out}.json` (mAP50, recall, ...)."""
    from pipeline.models import detector_identity, load_detector
    from pmu.io import write_json_atomic
    from pmu.runtime import select_device, set_threads

    params = settings.params
    data_yaml = Path(settings.data).resolve()
    if not data_yaml.is_file():
        raise InputError(f"--data {data_yaml}: no such file", "pass a YOLO dataset yaml")
    names = _read_names(data_yaml)
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = out.with_name(out.stem + ".runs").resolve()
    last = runs / "train" / "weights" / "last.pt"
    dev = select_device(settings.device)
    t0 = time.perf_counter()
    with no_integrations(), no_label_caches():
        if settings.resume and last.is_file():
            from ultralytics import YOLO

            model = YOLO(str(last))
            set_threads(threads)  # importing ultralytics pinned torch to one thread
            model.train(resume=True)
        else:
            shutil.rmtree(runs / "train", ignore_errors=True)
            model = load_detector(settings.preset, settings.detector)
            set_threads(threads)
            model.train(**_train_args(params, data_yaml, runs, dev))
    best = runs / "train" / "weights" / "best.pt"
    _save_best(best, out)
    summary = {
        "out": str(out),
        "weights": detector_identity(settings.preset, out)["weights"],
        "start": detector_identity(settings.preset, settings.detector),
        "data": str(data_yaml),
        "names": names,
        "params": asdict(params),
        "val": evaluate_detector(best, data_yaml, params.imgsz, params.batch, dev),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out.with_suffix(".json"), summary)
    return summary


def evaluate_detector(
    weights: str | os.PathLike, data_yaml: str | os.PathLike, imgsz: int, batch: int, dev: Any
) -> dict[str, float]:
    """mAP50, mAP50-95, mean precision and recall on the dataset's `val` split."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    with no_integrations(), no_label_caches():
        res = model.val(
            data=str(data_yaml),
            split="val",
            imgsz=imgsz,
            batch=batch,
            device="cpu" if dev.type == "cpu" else str(dev.index or 0),
            plots=False,
            verbose=False,
            workers=0,
        )
    box = res.box
    return {
        "map50": round(float(box.map50), 4),
        "map50_95": round(float(box.map), 4),
        "precision": round(float(box.mp), 4),
        "recall": round(float(box.mr), 4),
    }


def run_stage(settings: TrainDetectorSettings) -> str:
    """train-detector as the command runs it; returns what it prints."""
    from pipeline import checks

    checks.preset(settings.preset)
    checks.weights_file(settings.detector, "detector weights", "--detector")
    checks.device(settings.device)
    s = train_detector(settings)
    v = s["val"]
    return (
        f"train-detector: {s['params']['epochs']} epochs at {s['params']['imgsz']} px in "
        f"{s['seconds']} s -> {s['out']} (+ .json)\n"
        f"  held-out val: mAP50 {v['map50']:.3f}, mAP50-95 {v['map50_95']:.3f}, "
        f"precision {v['precision']:.3f}, recall {v['recall']:.3f}\n"
        f"  use it: detect-objects --detector {s['out']} (models.detector in params.yaml)"
    )


def read_summary(out_path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(out_path).with_suffix(".json").read_text(encoding="utf-8"))
