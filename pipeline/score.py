"""score-labels: labelled shards against ground truth (boxes, classes, image relation).

For a source whose truth is known (the synthetic world writes `truth.jsonl`, docs/world.md):
- detector recall (and precision) at IoU >= 0.5, one-to-one greedy matching by IoU;
- q_ent top-1 / top-5 accuracy on the detected crops matched to a true box: is the true box's
  class noun the crop's first (or among its first five) entities?
- q_rel top-1 accuracy: is the image's true relation its first relation?
Each image is scored once (mismatched pairs repeat an image with another caption). Chance levels
(1 / M, 5 / M, 1 / L) are reported beside the figures.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.settings import ScoreLabelsSettings
from pmu.errors import InputError
from pmu.truth import truth_by_image


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(
    detected: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], threshold: float = 0.5
) -> list[tuple[int, int]]:
    """(detected index, truth index) pairs: greedily by falling IoU, each box used once."""
    candidates = [
        (iou(d, t), i, j)
        for i, d in enumerate(detected)
        for j, t in enumerate(truth)
        if iou(d, t) >= threshold
    ]
    used_d, used_t, pairs = set(), set(), []
    for _, i, j in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
            pairs.append((i, j))
    return sorted(pairs)


class Tally:
    """Counts behind the figures (kept so that several shard folders can be summed)."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()

    def image(
        self,
        truth: dict[str, Any],
        boxes_px: list[list[float]],
        ent_top: list[list[str]],
        rel_top: str | None,
        threshold: float,
    ) -> None:
        c = self.c
        c["images"] += 1
        c["true_boxes"] += len(truth["boxes"])
        c["detected_boxes"] += len(boxes_px)
        pairs = match_boxes(boxes_px, truth["boxes"], threshold)
        c["matched_boxes"] += len(pairs)
        for i, j in pairs:
            noun = truth["classes"][j]
            c["matched_crops"] += 1
            c["ent_top1"] += bool(ent_top[i]) and ent_top[i][0] == noun
            c["ent_top5"] += noun in ent_top[i][:5]
        if truth.get("relation") is not None:
            c["relation_images"] += 1
            c["rel_top1"] += rel_top == truth["relation"]

    def figures(self, n_entities: int, n_relations: int) -> dict[str, Any]:
        c = self.c

        def ratio(a: str, b: str) -> float | None:
            return round(c[a] / c[b], 4) if c[b] else None

        return {
            "images": c["images"],
            "detector": {
                "recall_iou50": ratio("matched_boxes", "true_boxes"),
                "precision_iou50": ratio("matched_boxes", "detected_boxes"),
                "true_boxes": c["true_boxes"],
                "detected_boxes": c["detected_boxes"],
                "matched_boxes": c["matched_boxes"],
            },
            "q_ent": {
                "top1": ratio("ent_top1", "matched_crops"),
                "top5": ratio("ent_top5", "matched_crops"),
                "matched_crops": c["matched_crops"],
                "chance_top1": round(1 / n_entities, 6) if n_entities else None,
                "chance_top5": round(min(5, n_entities) / n_entities, 6) if n_entities else None,
            },
            "q_rel": {
                "top1": ratio("rel_top1", "relation_images"),
                "images": c["relation_images"],
                "chance_top1": round(1 / n_relations, 6) if n_relations else None,
            },
        }


def score_labels(
    shard_dir: str | os.PathLike,
    pairs_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Score the labels of a shard folder against truth.jsonl (joined through pairs.parquet)."""
    import pyarrow.parquet as pq

    from pmu import shards

    shard_dir = Path(shard_dir)
    if not shards.shard_paths(shard_dir):
        raise InputError(f"{shard_dir}: no shard-*.tar here (run label-objects)")
    entities, relations = shards.read_vocabularies(shard_dir)
    table = pq.read_table(pairs_path, columns=["id", "image_path"])
    ids, paths = table.column("id").to_pylist(), table.column("image_path").to_pylist()
    image_of = dict(zip(ids, paths, strict=True))
    truth = truth_by_image(truth_path)
    tally = Tally()
    seen: set[str] = set()
    missing_truth = 0
    for tar in shards.shard_paths(shard_dir):
        for raw in shards.iter_raw_samples(tar):
            s = shards.decode_sample(raw)
            meta = s["meta"]
            image = image_of.get(meta["id"])
            if image is None:
                raise InputError(f"{tar}: sample {meta['id']!r} is not in {pairs_path}")
            key = os.path.realpath(image)
            if key in seen:
                continue
            seen.add(key)
            row = truth.get(key)
            if row is None:
                missing_truth += 1
                continue
            w, h = meta["width"], meta["height"]
            # truth boxes are in the original image's pixels; the shard's are normalised to it
            boxes_px = [[x0 * w, y0 * h, x1 * w, y1 * h] for x0, y0, x1, y1 in meta["boxes"]]
            ent_top = [[entities[int(i)] for i in row] for row in s["ent_idx"]]
            rel_idx = s["rel_idx"].ravel()
            rel_top = relations[int(rel_idx[0])] if rel_idx.size else None
            tally.image(row, boxes_px, ent_top, rel_top, iou_threshold)
    figures = tally.figures(len(entities), len(relations))
    absent = sorted({n for r in truth.values() for n in r["classes"]} - set(entities))
    figures.update(
        iou_threshold=iou_threshold,
        images_without_truth=missing_truth,
        n_entities=len(entities),
        n_relations=len(relations),
        true_classes_missing_from_vocabulary=absent,
        counts=dict(sorted(tally.c.items())),
    )
    return figures


def format_scores(scores: dict[str, Any], title: str = "score-labels") -> str:
    """A few lines for the terminal."""
    d, e, r = scores["detector"], scores["q_ent"], scores["q_rel"]

    def pct(x: float | None) -> str:
        return "  n/a" if x is None else f"{100 * x:5.1f}%"

    lines = [
        f"{title}: {scores['images']} images",
        f"  detector recall@IoU{scores['iou_threshold']:.2f} {pct(d['recall_iou50'])}"
        f"  precision {pct(d['precision_iou50'])}  ({d['matched_boxes']} of {d['true_boxes']} "
        f"true boxes, {d['detected_boxes']} detected)",
        f"  q_ent top-1 {pct(e['top1'])}  top-5 {pct(e['top5'])}  on {e['matched_crops']} "
        f"matched crops (chance {pct(e['chance_top1'])} / {pct(e['chance_top5'])})",
        f"  q_rel top-1 {pct(r['top1'])}  on {r['images']} images (chance {pct(r['chance_top1'])})",
    ]
    if scores["true_classes_missing_from_vocabulary"]:
        lines.append(
            "  warning: true classes not in the entity vocabulary: "
            + ", ".join(scores["true_classes_missing_from_vocabulary"])
        )
    return "\n".join(lines)


def run_stage(settings: ScoreLabelsSettings) -> str:
    """score-labels as the command runs it: the figures, written as JSON when asked."""
    from pmu.io import write_json_atomic

    s = settings
    scores = score_labels(s.shard_dir, s.pairs, s.truth, s.iou)
    if s.out:
        write_json_atomic(s.out, scores)
    return format_scores(scores)
