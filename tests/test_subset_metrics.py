"""Scores on the image-dependent test items, on hand-made prediction files."""

import json

import pytest

from trainer.subset_metrics import ner_subset_scores, re_subset_scores


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_ner_subset_counts_only_the_listed_spans(tmp_path):
    preds = _write(
        tmp_path,
        "predictions.txt",
        "IMGID:a\nKestrel\tB-PER\tB-PER\nsaid\tO\tO\nParis\tB-LOC\tB-LOC\n\n"
        "IMGID:b\nBig\tO\tO\nday\tO\tO\nfor\tO\tO\nVarro\tB-ORG\tB-LOC\n\n"
        "IMGID:c\nVarro\tB-MISC\tO\nand\tO\tB-PER\nMo\tB-PER\tB-PER\n\n",
    )
    subset = _write(
        tmp_path,
        "subset.jsonl",
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"index": 0, "spans": [[0, 1, "PER"]]},  # right
                {"index": 1, "spans": [[3, 4, "ORG"]]},  # wrong type: counts as predicted
                {"index": 2, "spans": [[0, 1, "MISC"]]},  # missed; "and" is not on the span
            ]
        ),
    )
    s = ner_subset_scores(preds, subset)
    assert (s["support"], s["predicted"], s["correct"]) == (3, 2, 1)
    assert s["precision"] == 0.5 and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(0.4)


def test_re_subset_counts_only_flagged_lines(tmp_path):
    rows = [
        {"gold": "/per/misc/awarded", "pred": "/per/misc/awarded"},
        {"gold": "None", "pred": "/per/org/member_of"},
        {"gold": "/per/org/member_of", "pred": "None"},
        {"gold": "/per/loc/place_of_birth", "pred": "None"},  # not image-dependent
    ]
    preds = _write(tmp_path, "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    flags = [True, True, True, False]
    subset = _write(
        tmp_path,
        "s.jsonl",
        "".join(json.dumps({"index": i, "image_dependent": f}) + "\n" for i, f in enumerate(flags)),
    )
    s = re_subset_scores(preds, subset)
    assert (s["support"], s["predicted"], s["correct"], s["n"]) == (2, 2, 1, 3)
    assert s["f1"] == 0.5 and s["accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="lists"):
        re_subset_scores(preds, _write(tmp_path, "short.jsonl", '{"index": 0}\n'))
