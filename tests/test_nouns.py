"""mine-nouns with the real spaCy model: lemmas, filters, ordering, model resolution."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import nouns

CAPTIONS = [
    "Two dogs chase a ball across the park in London.",
    "The dog sleeps next to a ball while @nasa posts https://example.com/dogs photos.",
    "Firefighters rescue 3 cats from a burning house; a cat watches the crowd.",
    "A man with a camera photographs the dogs, x and y, at 10 am.",
]


@pytest.fixture(scope="module")
def nlp():
    return nouns.load_tagger("auto")


def test_auto_prefers_official_model_then_mirror():
    name = nouns.resolve_model_name("auto")
    assert name in nouns.PREFERRED_MODELS
    assert nouns.resolve_model_name("my_model") == "my_model"
    with pytest.raises(nouns.SpacyModelMissing):
        nouns.load_tagger("no_such_spacy_model_xyz")


def test_only_tagging_components_run(nlp):
    assert "ner" not in nlp.pipe_names and "parser" not in nlp.pipe_names
    assert "tagger" in nlp.pipe_names and "lemmatizer" in nlp.pipe_names


def test_counts_lemmas_and_filters(nlp):
    counts = nouns.count_nouns(CAPTIONS, nlp, batch_size=2, progress=False)
    assert counts["dog"] == 3  # dogs, dog, dogs -> one lower-cased lemma
    assert counts["ball"] == 2 and counts["cat"] == 2
    for dropped in ("3", "10", "x", "y", "@nasa", "nasa", "https://example.com/dogs", "the"):
        assert dropped not in counts
    assert "london" not in counts  # a proper noun
    with_propn = nouns.count_nouns(CAPTIONS, nlp, include_propn=True, progress=False)
    assert with_propn["london"] == 1 and "@nasa" not in with_propn


def test_top_m_is_deterministic():
    from collections import Counter

    ranked = nouns.top_m(Counter({"b": 2, "a": 2, "c": 5, "d": 1}), 3)
    assert ranked == [
        {"name": "c", "count": 5},
        {"name": "a", "count": 2},
        {"name": "b", "count": 2},
    ]


def test_mine_nouns_writes_vocabulary(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    # A mismatched pair repeats a caption: it is counted once.
    caps = CAPTIONS + [CAPTIONS[0]]
    pq.write_table(pa.table({"caption": caps, "itm": [1, 1, 1, 1, 0]}), pairs)
    out = tmp_path / "vocab" / "entities.json"
    doc = nouns.mine_nouns(pairs, out, m=4, progress=False)
    saved = json.loads(out.read_text())
    assert saved["m"] == 4 and saved["n_captions"] == 4
    assert saved["source"].startswith("spacy:en_core_web_sm")
    assert [e["name"] for e in saved["entities"]][:1] == ["dog"]
    assert len(saved["entities"]) == 4 and saved["entities"] == doc["entities"]
    assert "seconds" not in saved  # no timings in the file: re-runs are byte-identical
    first = out.read_bytes()
    nouns.mine_nouns(pairs, out, m=4, progress=False)
    assert out.read_bytes() == first
    assert "fewer" not in nouns.format_summary(doc, out)
