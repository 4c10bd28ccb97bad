"""Readers (Twitter NER, MNRE), sub-token alignment, CRF masking and entity markers."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA

from pipeline.models import load_tokenizer
from trainer.heads import CRFTagger, RelationHead
from trainer.ie_data import (
    MARKERS,
    DataFormatError,
    NerSentence,
    RelSample,
    Span,
    add_markers,
    encode_ner,
    encode_rel,
    find_image,
    load_rel2id,
    marked_words,
    ner_label_list,
    read_mnre,
    read_ner,
)

SAMPLE = REPO_ROOT / "trainer" / "sample"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- NER reader


def test_read_ner_twitter2015_style_maps_other_to_misc(tmp_path):
    path = write(
        tmp_path,
        "t15.txt",
        "IMGID:123\nRT\tO\nSuper\tB-OTHER\nBowl\tI-OTHER\nin\tO\nTexas\tB-LOC\n\n"
        "IMGID:124\nObama\tB-PER\n\n\n",
    )
    sents = read_ner(path)
    assert [s.img_id for s in sents] == ["123", "124"]
    assert sents[0].tokens == ["RT", "Super", "Bowl", "in", "Texas"]
    assert sents[0].labels == ["O", "B-MISC", "I-MISC", "O", "B-LOC"]
    assert sents[1].labels == ["B-PER"]
    assert sents[0].line == 2


def test_read_ner_accepts_sentences_without_imgid_and_crlf(tmp_path):
    path = write(tmp_path, "plain.txt", "Paris\tB-LOC\r\nis\tO\r\n\r\nhi\tO\r\n")
    sents = read_ner(path)
    assert [s.tokens for s in sents] == [["Paris", "is"], ["hi"]]
    assert sents[0].img_id is None


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("IMGID:1\nParis B-LOC\n", 2, "token<TAB>label"),
        ("IMGID:1\nParis\tB-LOC\nis\tX-LOC\n", 3, "not O, B-TYPE or I-TYPE"),
        ("IMGID:1\nParis\tB-LOC\textra\n", 2, "token<TAB>label"),
        ("IMGID:1\nIMGID:2\nParis\tB-LOC\n", 1, "without tokens"),
        ("IMGID:1\nParis\tB-LOC\n\nIMGID:2\n", 4, "without tokens"),
        ("IMGID:1\nParis\tB-\n", 2, "not O, B-TYPE or I-TYPE"),
    ],
)
def test_read_ner_malformed_names_file_and_line(tmp_path, text, line, reason):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(DataFormatError) as err:
        read_ner(path)
    assert err.value.line == line
    assert str(path) in str(err.value) and f":{line}:" in str(err.value)
    assert reason in str(err.value)


def test_bundled_ner_sample_reads():
    for split in ("train", "dev", "test"):
        sents = read_ner(SAMPLE / "mner" / f"{split}.txt")
        assert 10 <= len(sents) <= 100
        assert all(len(s.tokens) == len(s.labels) > 0 for s in sents)
    labels = ner_label_list(read_ner(SAMPLE / "mner" / "train.txt"))
    assert labels[0] == "O" and len(labels) == 9


@pytest.mark.skipif(not (SHARED_DATA / "twitter2017").is_dir(), reason="shared data absent")
def test_real_twitter2017_counts():
    counts = {
        s: len(read_ner(SHARED_DATA / "twitter2017" / f"{s}.txt"))
        for s in ("train", "valid", "test")
    }
    assert counts == {"train": 3373, "valid": 723, "test": 723}
    labels = {lab for s in read_ner(SHARED_DATA / "twitter2017" / "test.txt") for lab in s.labels}
    assert labels == set(ner_label_list([]))


# ----------------------------------------------------------------------------- MNRE reader


REL2ID = {"None": 0, "/per/per/peer": 1}


def test_read_mnre_good_line(tmp_path):
    line = (
        "{'token': ['Obama', 'meets', 'Merkel'], 'h': {'name': 'Obama', 'pos': [0, 1]}, "
        "'t': {'name': 'Merkel', 'pos': [2, 3]}, 'img_id': 'x.jpg', 'relation': '/per/per/peer'}"
    )
    path = write(tmp_path, "m.txt", line + "\n\n" + line + "\n")
    samples = read_mnre(path, REL2ID)
    assert len(samples) == 2 and samples[1].line == 3
    s = samples[0]
    assert (s.head.start, s.head.end, s.tail.start, s.tail.end) == (0, 1, 2, 3)
    assert s.relation == "/per/per/peer" and s.img_id == "x.jpg"


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{'token': ['a'], 'h': {'pos': [0, 1]}, 't': {'pos': [0, 1]}", "not a Python literal"),
        ("__import__('os').system('true')", "not a Python literal"),
        ("['a', 'b']", "expected a dict"),
        ("{'token': ['a'], 'h': {'pos': [0, 1]}, 'relation': 'None'}", "missing keys ['t']"),
        (
            "{'token': ['a', 'b'], 'h': {'pos': [0, 3]}, 't': {'pos': [1, 2]}, 'relation': 'None'}",
            "'h' pos [0, 3]",
        ),
        (
            "{'token': ['a', 'b'], 'h': {'pos': [1, 1]}, 't': {'pos': [1, 2]}, 'relation': 'None'}",
            "'h' pos [1, 1]",
        ),
        (
            "{'token': ['a', 'b'], 'h': {'pos': [0, 1]}, 't': {'pos': [1, 2]}, 'relation': 'x'}",
            "not in rel2id",
        ),
        ("{'token': [], 'h': {}, 't': {}, 'relation': 'None'}", "non-empty list"),
    ],
)
def test_read_mnre_malformed_names_file_and_line(tmp_path, line, reason):
    good = (
        "{'token': ['a', 'b'], 'h': {'name': 'a', 'pos': [0, 1]}, "
        "'t': {'name': 'b', 'pos': [1, 2]}, 'img_id': 'i.jpg', 'relation': 'None'}"
    )
    path = write(tmp_path, "bad.txt", f"{good}\n{line}\n")
    with pytest.raises(DataFormatError) as err:
        read_mnre(path, REL2ID)
    assert err.value.line == 2 and f"{path}:2:" in str(err.value)
    assert reason in str(err.value)


def test_load_rel2id_rejects_gaps(tmp_path):
    assert load_rel2id(write(tmp_path, "ok.json", json.dumps(REL2ID))) == REL2ID
    with pytest.raises(DataFormatError, match="indices 0..n-1"):
        load_rel2id(write(tmp_path, "gap.json", '{"None": 0, "x": 2}'))
    with pytest.raises(DataFormatError, match="invalid JSON"):
        load_rel2id(write(tmp_path, "broken.json", '{"None": 0,'))


def test_bundled_mre_sample_reads():
    rel2id = load_rel2id(SAMPLE / "mre" / "rel2id.json")
    for split in ("train", "dev", "test"):
        samples = read_mnre(SAMPLE / "mre" / f"{split}.txt", rel2id)
        assert 10 <= len(samples) <= 100
        assert {s.relation for s in samples} <= set(rel2id)


@pytest.mark.skipif(not (SHARED_DATA / "mnre").is_dir(), reason="shared data absent")
def test_real_mnre_counts():
    rel2id = load_rel2id(SHARED_DATA / "mnre" / "ours_rel2id.json")
    assert len(rel2id) == 23
    counts = {
        s: len(read_mnre(SHARED_DATA / "mnre" / f"mnre_{s}.txt", rel2id))
        for s in ("train", "val", "test")
    }
    assert counts == {"train": 12247, "val": 1624, "test": 1614}


# ----------------------------------------------------------------------------- alignment + CRF


def test_encode_ner_first_subtokens_and_truncation(tokenizer):
    sent = NerSentence(["Lionel", "Messi", "plays", "UNICEF"], ["B-PER", "I-PER", "O", "B-ORG"])
    label2id = {lab: i for i, lab in enumerate(ner_label_list([]))}
    feats, cut = encode_ner(sent, tokenizer, label2id, max_len=64)
    pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in sent.tokens]
    assert len(pieces[1]) > 1  # "messi" splits, so the test exercises continuation pieces
    expected, pos = [], 1
    for p in pieces:
        expected.append(pos)
        pos += len(p)
    assert cut == 0 and feats.word_index == expected
    assert feats.input_ids[0] == tokenizer.cls_token_id
    assert feats.input_ids[-1] == tokenizer.sep_token_id and len(feats.input_ids) == pos + 1
    assert feats.label_ids == [label2id[lab] for lab in sent.labels]
    # a budget that fits only the first two words: the rest are cut, whole words only
    budget = 1 + len(pieces[0]) + len(pieces[1]) + 1
    feats, cut = encode_ner(sent, tokenizer, label2id, max_len=budget)
    assert cut == 2 and feats.word_index == expected[:2] and len(feats.input_ids) == budget


def test_crf_ignores_continuation_subtokens():
    torch.manual_seed(0)
    tagger = CRFTagger(hidden_size=8, num_tags=5, dropout=0.0)
    states = torch.randn(2, 7, 8)
    word_index = torch.tensor([[1, 2, 4, 0], [1, 3, 0, 0]])
    word_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[1, 2, 0, 0], [3, 4, 0, 0]])
    loss = tagger.loss(states, word_index, word_mask, labels)
    tags = tagger.decode(states, word_index, word_mask)
    assert [len(t) for t in tags] == [3, 2]
    # scramble every position that is not a first sub-token ([CLS], continuations, padding)
    noisy = states.clone()
    keep = torch.zeros(2, 7, dtype=torch.bool)
    keep[0, [1, 2, 4]] = True
    keep[1, [1, 3]] = True
    noisy[~keep] = torch.randn(int((~keep).sum()), 8) * 100
    assert torch.allclose(tagger.loss(noisy, word_index, word_mask, labels), loss)
    assert tagger.decode(noisy, word_index, word_mask) == tags
    # and the CRF sees exactly the word sequence: same as a CRF run on the gathered words
    words0 = states[0, [1, 2, 4]].unsqueeze(0)
    ones = torch.ones(1, 3, dtype=torch.bool)
    nll0 = -tagger.crf(tagger.emit(words0), labels[:1, :3], ones, reduction="sum")
    words1 = states[1, [1, 3]].unsqueeze(0)
    nll1 = -tagger.crf(tagger.emit(words1), labels[1:, :2], ones[:, :2], reduction="sum")
    assert torch.allclose(loss, (nll0 + nll1) / 2)


# ----------------------------------------------------------------------------- markers


def test_marked_words_simple_and_nested():
    toks = ["Melbourne", "Taxi", "Service", "rocks"]
    assert marked_words(toks, Span("h", 0, 1), Span("t", 2, 3)) == [
        "[E1]", "Melbourne", "[/E1]", "Taxi", "[E2]", "Service", "[/E2]", "rocks",
    ]  # fmt: skip
    # tail nested in head at the same start: the outer span opens first, inner closes first
    assert marked_words(toks, Span("h", 0, 3), Span("t", 0, 1)) == [
        "[E1]", "[E2]", "Melbourne", "[/E2]", "Taxi", "Service", "[/E1]", "rocks",
    ]  # fmt: skip
    # tail before head; adjacent spans close before the next opens
    assert marked_words(toks, Span("h", 1, 2), Span("t", 0, 1)) == [
        "[E2]", "Melbourne", "[/E2]", "[E1]", "Taxi", "[/E1]", "Service", "rocks",
    ]  # fmt: skip


def test_add_markers_idempotent_and_encode_rel(tokenizer):
    tok = load_tokenizer("tiny")
    n0 = len(tok)
    ids = add_markers(tok)
    assert len(tok) == n0 + 4 and ids == list(range(n0, n0 + 4))
    assert add_markers(tok) == ids and len(tok) == n0 + 4
    assert tok.convert_ids_to_tokens(ids) == list(MARKERS)
    sample = RelSample(
        ["Lionel", "Messi", "joins", "UNICEF"], Span("h", 0, 2), Span("t", 3, 4), "/per/per/peer"
    )
    feats = encode_rel(sample, tok, REL2ID, max_len=64, marker_ids=ids)
    assert feats.label_id == 1 and not feats.truncated
    assert feats.input_ids[feats.head_pos] == ids[0]
    assert feats.input_ids[feats.tail_pos] == ids[2]
    assert (
        tok.convert_ids_to_tokens(feats.input_ids[feats.tail_pos + 1]) == "uni"
    )  # uni ##c ##e ##f
    assert feats.input_ids.count(ids[1]) == 1 and feats.input_ids.count(ids[3]) == 1
    # the markers never get cut: a long sentence is windowed around them
    long = RelSample(
        ["word"] * 100 + ["Lionel", "Messi"] + ["word"] * 100,
        Span("h", 100, 101),
        Span("t", 101, 102),
        "None",
    )
    feats = encode_rel(long, tok, REL2ID, max_len=16, marker_ids=ids)
    assert feats.truncated and len(feats.input_ids) == 16
    assert all(i in feats.input_ids for i in ids)
    assert feats.input_ids[feats.head_pos] == ids[0] and feats.input_ids[feats.tail_pos] == ids[2]


def test_relation_head_reads_start_markers():
    torch.manual_seed(0)
    head = RelationHead(hidden_size=4, num_relations=3, dropout=0.0)
    states = torch.randn(2, 6, 4)
    logits = head(states, torch.tensor([1, 2]), torch.tensor([3, 5]))
    expected = head.classify(torch.cat([states[1, 2], states[1, 5]]))
    assert logits.shape == (2, 3) and torch.allclose(logits[1], expected)


def test_find_image(tmp_path):
    (tmp_path / "17_06_1.jpg").write_bytes(b"x")
    (tmp_path / "tw_2.jpg").write_bytes(b"x")
    assert find_image(tmp_path, "17_06_1") == tmp_path / "17_06_1.jpg"
    assert find_image(tmp_path, "tw_2.jpg") == tmp_path / "tw_2.jpg"
    assert find_image(tmp_path, "missing") is None
    assert find_image(None, "17_06_1") is None
    assert find_image(tmp_path, "../17_06_1") == tmp_path / "17_06_1.jpg"  # stays in the folder


def test_encode_ner_first_word_longer_than_max_len_keeps_its_first_pieces(tokenizer):
    long_word = "x" + "yz" * 40  # many word pieces
    sent = NerSentence([long_word, "Messi"], ["B-MISC", "B-PER"])
    label2id = {lab: i for i, lab in enumerate(ner_label_list([]))}
    assert len(tokenizer(long_word, add_special_tokens=False)["input_ids"]) > 8
    feats, cut = encode_ner(sent, tokenizer, label2id, max_len=8)
    # the CRF needs at least one word: the first word keeps the pieces that fit
    assert feats.word_index == [1] and feats.label_ids == [label2id["B-MISC"]]
    assert len(feats.input_ids) == 8 and cut == 1
    assert feats.input_ids[-1] == tokenizer.sep_token_id
