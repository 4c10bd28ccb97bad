"""Scores on a subset of the test set: the entities / relations that only the image settles.

The synthetic world (docs/world.md) lists them in `mner/test_image_dependent.jsonl` (per test
sentence, its image-dependent spans `[start, end_exclusive, type]`) and
`mre/test_image_dependent.jsonl` (per test line, `image_dependent`). These functions read
`trainer/finetune.py`'s prediction files and score only those items.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainer.metrics import _prf, re_scores


def _jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_conll_predictions(path: str | os.PathLike) -> list[tuple[list[str], list[str]]]:
    """(gold, predicted) label lists per sentence of a finetune.py MNER predictions file."""
    sentences, gold, pred = [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if gold:
                sentences.append((gold, pred))
            gold, pred = [], []
        elif not line.startswith("IMGID:"):
            _, g, p = line.split("\t")
            gold.append(g)
            pred.append(p)
    if gold:
        sentences.append((gold, pred))
    return sentences


def ner_subset_scores(predictions: str | os.PathLike, subset: str | os.PathLike) -> dict:
    """Entity-level P/R/F1 on the listed spans: gold = the listed spans; predicted = predicted
    entities that overlap a listed span (a wrong type or boundary there counts against P)."""
    from seqeval.metrics.sequence_labeling import get_entities

    sentences = read_conll_predictions(predictions)
    rows = _jsonl(subset)
    if len(rows) != len(sentences):
        raise ValueError(
            f"{subset} lists {len(rows)} sentences, {predictions} has {len(sentences)}"
        )
    correct = predicted = gold_n = 0
    for row in rows:
        _, pred = sentences[row["index"]]
        spans = [(int(s), int(e), t) for s, e, t in row["spans"]]
        gold = {(t, s, e - 1) for s, e, t in spans}
        kept = {
            (t, s, e)
            for t, s, e in get_entities(pred)
            if any(s <= ge - 1 and e >= gs for gs, ge, _ in spans)
        }
        gold_n += len(gold)
        predicted += len(kept)
        correct += len(gold & kept)
    out = _prf(correct, predicted, gold_n)
    out.update(support=gold_n, predicted=predicted, correct=correct)
    return out


def re_subset_scores(
    predictions: str | os.PathLike, subset: str | os.PathLike, none_label: str = "None"
) -> dict:
    """Micro P/R/F1 (none_label excluded) and accuracy on the lines flagged image_dependent."""
    preds = _jsonl(predictions)
    rows = _jsonl(subset)
    if len(rows) != len(preds):
        raise ValueError(f"{subset} lists {len(rows)} lines, {predictions} has {len(preds)}")
    keep = [preds[r["index"]] for r in rows if r["image_dependent"]]
    scores = re_scores([p["gold"] for p in keep], [p["pred"] for p in keep], none_label)
    return scores["overall"]
