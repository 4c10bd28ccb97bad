"""MNER / MRE metrics on hand-worked examples."""

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score

from trainer.metrics import majority_baseline_ner, majority_baseline_re, ner_scores, re_scores


def test_ner_scores_hand_worked():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"]]
    # gold: PER(0-1) LOC(3) | ORG(0) MISC(2-3); pred: PER(0-1) ORG(3) | ORG(0) MISC(2)
    # correct: PER, ORG in sentence 2 -> P = 2/4, R = 2/4
    s = ner_scores(gold, pred)
    o = s["overall"]
    assert (o["precision"], o["recall"], o["f1"]) == (0.5, 0.5, 0.5)
    assert (o["support"], o["predicted"], o["correct"]) == (4, 4, 2)
    t = s["per_type"]
    assert t["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert t["ORG"]["precision"] == 0.5 and t["ORG"]["recall"] == 1.0
    assert t["ORG"]["f1"] == pytest.approx(2 / 3)
    assert t["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert t["MISC"]["f1"] == 0.0  # a partial span is wrong
    assert o["f1"] == pytest.approx(f1_score(gold, pred))


def test_ner_scores_conlleval_mode_and_agreement_with_seqeval():
    # conlleval: an I- without a B- starts an entity; a type change inside a span splits it
    gold = [["O", "I-PER", "I-PER", "O"], ["B-LOC", "I-ORG", "O", "B-PER"]]
    pred = [["O", "B-PER", "I-PER", "O"], ["B-LOC", "B-ORG", "O", "O"]]
    s = ner_scores(gold, pred)["overall"]
    # gold: PER(1-2) | LOC(0) ORG(1) PER(3); pred: PER(1-2) | LOC(0) ORG(1) -> 3 of 3, 3 of 4
    assert (s["precision"], s["recall"]) == (1.0, 0.75)
    assert s["f1"] == pytest.approx(6 / 7)
    assert s["precision"] == pytest.approx(precision_score(gold, pred))
    assert s["recall"] == pytest.approx(recall_score(gold, pred))
    assert s["f1"] == pytest.approx(f1_score(gold, pred))


def test_ner_scores_rejects_length_mismatch():
    with pytest.raises(ValueError):
        ner_scores([["O", "O"]], [["O"]])


def test_ner_majority_baseline_is_zero():
    assert majority_baseline_ner([["B-PER", "O"], ["O"]])["overall"]["f1"] == 0.0


def test_re_scores_hand_worked():
    gold = ["A", "None", "B", "A", "None"]
    pred = ["A", "A", "None", "B", "None"]
    # non-None predictions: 3 (pos 0, 1, 3), correct among them: 1 (pos 0); non-None gold: 3
    s = re_scores(gold, pred)
    o = s["overall"]
    assert o["precision"] == pytest.approx(1 / 3) and o["recall"] == pytest.approx(1 / 3)
    assert o["f1"] == pytest.approx(1 / 3)
    assert o["accuracy"] == pytest.approx(2 / 5)
    assert (o["support"], o["predicted"], o["correct"], o["n"]) == (3, 3, 1, 5)
    assert s["per_relation"]["A"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert s["per_relation"]["B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert "None" not in s["per_relation"]


def test_re_scores_none_only_predictions_and_baseline():
    gold = ["A", "None", "None", "None"]
    s = re_scores(gold, ["None"] * 4)["overall"]
    assert (s["precision"], s["recall"], s["f1"], s["accuracy"]) == (0.0, 0.0, 0.0, 0.75)
    base = majority_baseline_re(["None", "None", "A"], gold)["overall"]
    assert base["accuracy"] == 0.75 and base["f1"] == 0.0
    base = majority_baseline_re(["A", "A", "None"], gold)["overall"]
    assert base["precision"] == 0.25 and base["recall"] == 1.0 and base["accuracy"] == 0.25
