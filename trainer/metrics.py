"""Standard MNER / MRE metrics: seqeval entity-level P/R/F1 and micro P/R/F1 without `None`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    p = correct / predicted if predicted else 0.0
    r = correct / gold if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def ner_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity-level micro P/R/F1 and per type, seqeval's default (conlleval-compatible) mode.

    Counts come from seqeval's own entity extraction, so the overall figures equal
    `seqeval.metrics.f1_score(gold, pred)`; per-type counts are reported beside them.
    """
    from seqeval.metrics.sequence_labeling import get_entities

    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred, strict=True)):
        raise ValueError("gold and predicted sequences differ in number or length")
    gold_ents: Counter = Counter()
    pred_ents: Counter = Counter()
    correct: Counter = Counter()
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        g_set = {(i, *e) for e in get_entities(list(g))}
        p_set = {(i, *e) for e in get_entities(list(p))}
        gold_ents.update(e[1] for e in g_set)
        pred_ents.update(e[1] for e in p_set)
        correct.update(e[1] for e in g_set & p_set)
    types = sorted(set(gold_ents) | set(pred_ents))
    per_type = {
        t: {**_prf(correct[t], pred_ents[t], gold_ents[t]), "support": gold_ents[t]} for t in types
    }
    overall = _prf(sum(correct.values()), sum(pred_ents.values()), sum(gold_ents.values()))
    overall.update(
        support=sum(gold_ents.values()),
        predicted=sum(pred_ents.values()),
        correct=sum(correct.values()),
    )
    return {"overall": overall, "per_type": per_type}


def re_scores(gold: Sequence[str], pred: Sequence[str], none_label: str = "None") -> dict:
    """Micro P/R/F1 over non-`None` labels, accuracy over all, and per relation.

    P = correct non-None predictions / non-None predictions;
    R = correct non-None predictions / non-None gold labels.
    """
    if len(gold) != len(pred):
        raise ValueError("gold and predicted labels differ in number")
    gold_n: Counter = Counter(g for g in gold if g != none_label)
    pred_n: Counter = Counter(p for p in pred if p != none_label)
    correct: Counter = Counter(g for g, p in zip(gold, pred, strict=True) if g == p != none_label)
    overall = _prf(sum(correct.values()), sum(pred_n.values()), sum(gold_n.values()))
    overall.update(
        accuracy=sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold) if gold else 0.0,
        support=sum(gold_n.values()),
        predicted=sum(pred_n.values()),
        correct=sum(correct.values()),
        n=len(gold),
    )
    relations = sorted(set(gold_n) | set(pred_n))
    per_relation = {
        r: {**_prf(correct[r], pred_n[r], gold_n[r]), "support": gold_n[r]} for r in relations
    }
    return {"overall": overall, "per_relation": per_relation}


def majority_baseline_ner(gold: Sequence[Sequence[str]]) -> dict:
    """All-`O` tagging (the majority label): no entities, F1 0 — the floor a tagger must beat."""
    return ner_scores(gold, [["O"] * len(g) for g in gold])


def majority_baseline_re(
    train_labels: Sequence[str], gold: Sequence[str], none_label: str = "None"
) -> dict:
    """Always predict the most frequent training relation."""
    label = Counter(train_labels).most_common(1)[0][0]
    return re_scores(gold, [label] * len(gold), none_label)
