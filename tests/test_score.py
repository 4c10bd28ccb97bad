"""score-labels on hand-made cases: IoU matching, recall, q_ent top-1/top-5, q_rel top-1."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.prepare import Pair, write_pairs_parquet
from pipeline.score import format_scores, iou, match_boxes, score_labels
from pmu import shards
from pmu.io import write_json_atomic

ENTITIES = ["person", "dog", "car", "trophy", "flag", "tree"]
RELATIONS = ["award received", "owner of", "sport"]


def test_iou_and_greedy_one_to_one_matching():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
    truth = [[0, 0, 10, 10], [20, 20, 30, 30]]
    # two detections on the first true box: only the better one matches it
    detected = [[1, 0, 11, 10], [0, 0, 10, 10], [21, 20, 31, 30], [50, 50, 60, 60]]
    assert match_boxes(detected, truth) == [(1, 0), (2, 1)]
    assert match_boxes(detected, truth, threshold=0.99) == [(1, 0)]


def _write_case(tmp_path):
    """3 images (one also in a mismatched pair), with known truth and hand-set labels."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for name in ("a", "b", "c"):
        (img_dir / f"{name}.jpg").write_bytes(b"x")  # never decoded by the scorer
    truth = [
        {"image": "images/a.jpg", "width": 100, "height": 50, "relation": "award received",
         "boxes": [[0, 0, 50, 50], [60, 10, 90, 40]], "classes": ["person", "trophy"]},
        {"image": "images/b.jpg", "width": 100, "height": 100, "relation": "owner of",
         "boxes": [[10, 10, 40, 40], [50, 50, 90, 90]], "classes": ["person", "dog"]},
        {"image": "images/c.jpg", "width": 80, "height": 80, "relation": "sport",
         "boxes": [[0, 0, 40, 40]], "classes": ["person"]},
    ]  # fmt: skip
    (tmp_path / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth))
    pairs = [
        Pair("a", "world", str(img_dir / "a.jpg"), "cap a", 1, 100, 50),
        Pair("a-neg", "world", str(img_dir / "a.jpg"), "cap b", 0, 100, 50),
        Pair("b", "world", str(img_dir / "b.jpg"), "cap b", 1, 100, 100),
        Pair("c", "world", str(img_dir / "c.jpg"), "cap c", 1, 80, 80),
    ]
    write_pairs_parquet(pairs, tmp_path / "pairs.parquet")

    def sample(sid, w, h, boxes_px, ent_rows, rel_row):
        boxes = [[x0 / w, y0 / h, x1 / w, y1 / h] for x0, y0, x1, y1 in boxes_px]
        ent_idx = np.array(ent_rows, np.int32).reshape(len(boxes), 5)
        meta = {"itm": 1, "width": w, "height": h, "boxes": boxes}
        return shards.LabelledSample(
            id=sid, jpg=b"j", caption="c", meta=meta, ent_idx=ent_idx,
            ent_prob=np.full(ent_idx.shape, 0.1, np.float32),
            rel_idx=np.array(rel_row, np.int32), rel_prob=np.full(len(rel_row), 0.1, np.float32),
        )  # fmt: skip

    e = {n: i for i, n in enumerate(ENTITIES)}
    r = {n: i for i, n in enumerate(RELATIONS)}
    samples = [
        # a: both boxes found; person top-1 right; trophy only at rank 3 (top-5 right)
        sample("a", 100, 50, [[0, 0, 48, 50], [60, 10, 90, 40]],
               [[e["person"], e["dog"], e["car"], e["tree"], e["flag"]],
                [e["dog"], e["car"], e["trophy"], e["tree"], e["flag"]]],
               [r["award received"], r["sport"]]),
        # the mismatched pair repeats image a with wrong labels: it must not be counted again
        sample("a-neg", 100, 50, [[0, 0, 10, 10]], [[e["tree"]] * 5], [r["sport"]]),
        # b: one good detection (dog, top-1 wrong: car), one box far from any truth; rel wrong
        sample("b", 100, 100, [[52, 50, 90, 92], [0, 60, 5, 65]],
               [[e["car"], e["dog"], e["tree"], e["flag"], e["person"]],
                [e["person"]] * 5],
               [r["sport"], r["owner of"]]),
        # c: nothing detected; relation right
        sample("c", 80, 80, [], [], [r["sport"]]),
    ]  # fmt: skip
    out = tmp_path / "shards"
    out.mkdir()
    shards.write_shard(out / shards.SHARD_PATTERN.format(0), samples[:2])
    shards.write_shard(out / shards.SHARD_PATTERN.format(1), samples[2:])
    write_json_atomic(
        out / shards.ENTITIES_FILE, {"entities": [{"name": n, "count": 1} for n in ENTITIES]}
    )
    relations = [{"pid": f"P{i}", "label": n} for i, n in enumerate(RELATIONS)]
    write_json_atomic(out / shards.RELATIONS_FILE, {"relations": relations})
    return out


def test_scores_of_a_hand_made_case(tmp_path):
    out = _write_case(tmp_path)
    s = score_labels(out, tmp_path / "pairs.parquet", tmp_path / "truth.jsonl")
    assert s["images"] == 3 and s["images_without_truth"] == 0
    d = s["detector"]
    assert (d["true_boxes"], d["detected_boxes"], d["matched_boxes"]) == (5, 4, 3)
    assert d["recall_iou50"] == 0.6 and d["precision_iou50"] == 0.75
    e = s["q_ent"]
    assert e["matched_crops"] == 3
    assert e["top1"] == pytest.approx(1 / 3, abs=1e-4)  # only image a's person
    assert e["top5"] == 1.0  # trophy at rank 3, dog at rank 2
    assert e["chance_top1"] == pytest.approx(1 / 6, abs=1e-6)
    assert s["q_rel"]["top1"] == pytest.approx(2 / 3, abs=1e-4) and s["q_rel"]["images"] == 3
    assert s["true_classes_missing_from_vocabulary"] == []
    text = format_scores(s)
    assert "recall@IoU0.50  60.0%" in text and "q_rel top-1  66.7%" in text


def test_cli_writes_json_and_missing_vocabulary_classes_are_named(tmp_path):
    out = _write_case(tmp_path)
    truth = tmp_path / "truth.jsonl"
    rows = [json.loads(x) for x in truth.read_text().splitlines()]
    rows[2]["classes"] = ["guitar"]  # a true class the vocabulary lacks: always wrong, named
    truth.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(
        app,
        ["score-labels", str(out), "--pairs", str(tmp_path / "pairs.parquet"),
         "--truth", str(truth), "--out", str(tmp_path / "q.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["true_classes_missing_from_vocabulary"] == ["guitar"]
    assert "guitar" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(
        app, ["score-labels", str(empty), "--pairs", str(tmp_path / "pairs.parquet"),
              "--truth", str(truth)],
    )  # fmt: skip
    assert res.exit_code == 2 and "no shard" in res.output
