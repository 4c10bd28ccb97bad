"""train-detector through ultralytics' own trainer, on a small world's YOLO export: weights that
detect-objects can load, held-out metrics, and a dataset folder that is only ever read."""

import pickle

import numpy as np
import pytest

from pipeline.detector_train import train_detector
from pipeline.models import load_detector
from pipeline.settings import DetectorTrainParams, TrainDetectorSettings
from pipeline.world import build_world

pytestmark = pytest.mark.slow


def tree(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


class Planted:
    """Unpickling this creates `marker` (what a malicious label cache could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("detector")
    world = root / "world"
    build_world(world, n=2, seed=3, n_adapt=40, mner=(1, 1, 1), mre=(1, 1, 1), image_size_px=64)
    yolo = world / "yolo"
    marker = root / "unpickled"
    with open(yolo / "labels" / "train.cache", "wb") as f:
        np.save(f, np.array({"version": "x", "payload": Planted(marker)}, dtype=object))
    pickle.loads(pickle.dumps(Planted(root / "canary")))  # the payload works when unpickled
    assert (root / "canary").is_file()
    before = tree(yolo)
    out = root / "detector.safetensors"
    params = DetectorTrainParams(epochs=1, imgsz=64, batch=8, cache=False)
    settings = TrainDetectorSettings(
        data=str(yolo / "data.yaml"), out=str(out), preset="tiny", device="cpu", params=params
    )
    summary = train_detector(settings)
    return summary, out, yolo, before, marker


def test_writes_loadable_weights_and_held_out_metrics(trained):
    summary, out, *_ = trained
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert set(summary["val"]) == {"map50", "map50_95", "precision", "recall"}
    assert all(0.0 <= v <= 1.0 for v in summary["val"].values())
    assert summary["names"][0] == "person" and len(summary["names"]) == 12
    model = load_detector("tiny", out)
    assert model.names == summary["names"]


def test_dataset_folder_is_only_read(trained):
    _, _, yolo, before, _ = trained
    assert tree(yolo) == before  # no labels/*.cache written or rewritten


def test_planted_label_cache_is_never_unpickled(trained):
    *_, marker = trained
    assert not marker.exists()
