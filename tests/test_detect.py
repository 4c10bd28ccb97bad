"""detect-objects: one row per prepared pair, top-K boxes by confidence, rejects recorded."""

import pyarrow.parquet as pq
import pytest
from labeling_inputs import write_labeling_inputs

from pipeline.detect import detect_objects
from pipeline.labeling_data import read_boxes, read_pairs
from pipeline.models import coco_names
from pipeline.settings import DetectParams, DetectSettings
from pmu.errors import InputError

FAST = dict(batch_size=3, imgsz=64, conf=0.0, top_k=3)


def detect(pairs, out, params: DetectParams):
    settings = DetectSettings(pairs=str(pairs), out=str(out), params=params)
    return detect_objects(settings, progress=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_labeling_inputs(tmp_path_factory.mktemp("detect"), n=8, broken=(5,))


def test_every_pair_gets_a_row_with_top_k_boxes(inputs, tmp_path):
    out = tmp_path / "boxes.parquet"
    summary = detect(inputs["pairs"], out, DetectParams(**FAST))
    pairs = read_pairs(inputs["pairs"])
    rows, meta = read_boxes(out)
    assert list(pq.read_table(out).column("id").to_pylist()) == pairs["id"]  # pair order kept
    assert summary["images"] == 6 and summary["pairs"] == 8  # pairs 3, 7 re-use an image
    names = set(coco_names().values())
    for sid, w, h in zip(pairs["id"], pairs["width"], pairs["height"], strict=True):
        row = rows[sid]
        if sid == "pair-0005":  # truncated after prepare: recorded, not dropped
            assert row["error"].startswith("image: truncated") and row["boxes"] == []
            continue
        assert row["error"] is None and (row["width"], row["height"]) == (w, h)
        assert len(row["boxes"]) == len(row["classes"]) == len(row["confs"]) == 3
        assert row["confs"] == sorted(row["confs"], reverse=True)
        assert set(row["classes"]) <= names
        for x0, y0, x1, y1 in row["boxes"]:
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
    assert rows["pair-0003"]["boxes"] == rows["pair-0002"]["boxes"]
    assert meta["params"]["top_k"] == 3 and meta["preset"] == "tiny"
    assert meta["detector"]["source"] == "yolo11n.yaml"


def test_images_without_detections_are_kept_with_empty_lists(inputs, tmp_path):
    out = tmp_path / "boxes.parquet"
    params = DetectParams(**dict(FAST, conf=0.99))  # the random detector never gets there
    summary = detect(inputs["pairs"], out, params)
    rows, _ = read_boxes(out)
    assert len(rows) == 8 and summary["without_detections"] == 7 and summary["boxes"] == 0
    assert all(r["boxes"] == [] and r["classes"] == [] and r["confs"] == [] for r in rows.values())


def test_same_inputs_give_identical_bytes_with_or_without_workers(inputs, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    detect(inputs["pairs"], a, DetectParams(**FAST))
    params = DetectParams(**dict(FAST, num_workers=2))
    detect(inputs["pairs"], b, params)
    assert a.read_bytes() == b.read_bytes()


def test_bad_parameters_are_refused(inputs, tmp_path):
    with pytest.raises(InputError, match="batch-size"):
        detect(inputs["pairs"], tmp_path / "x.parquet", DetectParams(batch_size=0))
