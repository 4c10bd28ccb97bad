"""The synthetic world: determinism, file formats, truth vs rules, prepare, spaCy nouns."""

import csv
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA
from typer.testing import CliRunner

from pipeline.world import build_world
from pipeline.world.ontology import (
    CLASS_NAMES,
    MNER_KEY_CLASS,
    MRE_FROM_RELATION,
    MRE_LABELS,
    RULES,
    matching_rules,
)
from pmu.errors import InputError
from trainer.ie_data import find_image, load_rel2id, read_mnre, read_ner

# MNER train: 48 image-dependent sentences = 4 types x 12 ambiguous names, so each name must
# meet every type there.
ARGS = dict(n=120, n_adapt=16, mner=(96, 8, 48), mre=(48, 8, 48), image_size_px=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, seed=0, workers=1, **ARGS)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _meta(root: Path) -> dict:
    return json.loads((root / "world.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_with_any_worker_count(world, tmp_path):
    again = tmp_path / "again"
    build_world(again, seed=0, workers=2, **ARGS)
    first, second = _files(world), _files(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    table = _meta(world)["files"]
    assert list(table) == sorted(table)
    assert set(table) == set(first) - {"world.json"}
    for rel, data in first.items():
        if rel != "world.json":
            assert table[rel] == hashlib.sha256(data).hexdigest(), rel


def test_another_seed_gives_another_world(world, tmp_path):
    other = tmp_path / "other"
    build_world(other, seed=1, workers=1, **ARGS)
    a, b = _meta(world)["files"], _meta(other)["files"]
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k] != b[k]]
    assert len(differing) > 0.9 * len(a) - 10  # only the fixed tables may coincide
    assert a["relations.tsv"] == b["relations.tsv"] and a["mre/rel2id.json"] == b["mre/rel2id.json"]


def test_rebuild_replaces_a_world_but_never_another_folder(tmp_path):
    small = dict(n=4, n_adapt=8, mner=(2, 1, 2), mre=(2, 1, 2), image_size_px=64)
    out = tmp_path / "w"
    build_world(out, seed=3, **small)
    (out / "stray.txt").write_text("left by a user")
    build_world(out, seed=3, **small)
    assert not (out / "stray.txt").exists() and (out / "world.json").is_file()
    assert not list(tmp_path.glob(".w.*"))  # no staging or old folder left behind
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        build_world(busy, seed=3, **small)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="n_adapt"):
        build_world(tmp_path / "x", n=4, n_adapt=3, mner=(1, 1, 1), mre=(1, 1, 1))


# ----------------------------------------------------------------------------- corpus, adapt


@pytest.mark.parametrize("split", ["corpus", "adapt"])
def test_truth_follows_the_rule_table_and_boxes_lie_inside(world, split):
    truth = _jsonl(world / split / "truth.jsonl")
    assert len(truth) == ARGS["n" if split == "corpus" else "n_adapt"]
    for row in truth:
        assert set(row) == {"image", "width", "height", "boxes", "classes", "relation"}
        assert matching_rules(row["classes"]) == [row["relation"]]
        assert 2 <= len(row["classes"]) <= 4 and len(set(row["classes"])) == len(row["classes"])
        assert set(row["classes"]) <= set(CLASS_NAMES)
        assert max(row["width"], row["height"]) == ARGS["image_size_px"]
        assert len(row["boxes"]) == len(row["classes"])
        for x0, y0, x1, y1 in row["boxes"]:
            assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
        from PIL import Image

        with Image.open(world / split / row["image"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (row["width"], row["height"])


def test_pairs_interleave_mismatches_whose_objects_differ(world):
    rows = _jsonl(world / "corpus" / "pairs.jsonl")
    truth = {t["image"]: t for t in _jsonl(world / "corpus" / "truth.jsonl")}
    assert [list(r) for r in rows[:1]] == [["id", "image_path", "caption", "itm"]]
    assert len({r["id"] for r in rows}) == len(rows)
    positives = {r["image_path"]: r for r in rows if r["itm"] == 1}
    negatives = [r for r in rows if r["itm"] == 0]
    assert len(positives) == ARGS["n"]
    assert 0.3 * ARGS["n"] <= len(negatives) <= 0.7 * ARGS["n"]
    first_negative = next(i for i, r in enumerate(rows) if r["itm"] == 0)
    assert first_negative < 10  # interleaved, not appended at the end
    caption_image = {r["caption"]: r["image_path"] for r in positives.values()}
    for neg in negatives:
        assert neg["caption"] != positives[neg["image_path"]]["caption"]
        source = truth[caption_image[neg["caption"]]]
        assert source["relation"] != truth[neg["image_path"]]["relation"]
    adapt = _jsonl(world / "adapt" / "pairs.jsonl")
    assert {r["itm"] for r in adapt} == {1}
    corpus_hashes = {
        hashlib.sha256(p.read_bytes()).digest() for p in (world / "corpus").rglob("*.jpg")
    }
    adapt_hashes = {
        hashlib.sha256(p.read_bytes()).digest() for p in (world / "adapt").rglob("*.jpg")
    }
    assert not corpus_hashes & adapt_hashes


def test_every_relation_and_class_occurs(world):
    meta = _meta(world)
    assert [c["name"] for c in meta["classes"]] == list(CLASS_NAMES)
    assert len(CLASS_NAMES) >= 12 and 8 <= len(RULES) <= 10
    counts = meta["counts"]["corpus"]
    assert set(counts["relations"]) == {r.label for r in RULES}
    assert set(counts["objects"]) == set(CLASS_NAMES)


def test_prepare_accepts_the_world_corpus_and_adapt_split(world, tmp_path):
    from pipeline.prepare import prepare
    from pipeline.readers import read_source

    result = prepare(read_source("world", str(world)), tmp_path / "p", progress=False)
    lines = (world / "corpus" / "pairs.jsonl").read_text().splitlines()
    assert result.rejected == [] and result.n_negatives == 0
    assert len(result.pairs) == len(lines) and {p.source for p in result.pairs} == {"world"}
    assert Path(result.pairs[0].image_path).is_file()
    adapt = prepare(read_source("world", str(world / "adapt")), tmp_path / "a", progress=False)
    assert adapt.rejected == [] and adapt.n_input == ARGS["n_adapt"]
    with pytest.raises(InputError, match="world folder"):
        read_source("world", str(tmp_path))


# ----------------------------------------------------------------------------- yolo, relations


def test_yolo_export_is_valid_and_loads_in_ultralytics(world, monkeypatch, tmp_path):
    data = yaml.safe_load((world / "yolo" / "data.yaml").read_text())
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert [data["names"][i] for i in range(len(data["names"]))] == list(CLASS_NAMES)
    adapt = {t["image"].split("/")[-1]: t for t in _jsonl(world / "adapt" / "truth.jsonl")}
    seen = Counter()
    for split in ("train", "val"):
        for img in sorted((world / "yolo" / "images" / split).glob("*.jpg")):
            seen[split] += 1
            assert img.read_bytes() == (world / "adapt" / "images" / img.name).read_bytes()
            label = world / "yolo" / "labels" / split / f"{img.stem}.txt"
            lines = [line.split() for line in label.read_text().splitlines()]
            truth = adapt[img.name]
            assert [CLASS_NAMES[int(f[0])] for f in lines] == truth["classes"]
            for fields, (x0, y0, x1, y1) in zip(lines, truth["boxes"], strict=True):
                cx, cy, w, h = map(float, fields[1:])
                assert all(0 < v <= 1 for v in (cx, cy, w, h))
                assert cx == pytest.approx((x0 + x1) / 2 / truth["width"], abs=1e-5)
                assert h == pytest.approx((y1 - y0) / truth["height"], abs=1e-5)
    assert seen["train"] + seen["val"] == ARGS["n_adapt"] and seen["val"] >= 1
    from ultralytics.data.utils import check_det_dataset

    monkeypatch.chdir(tmp_path)  # the export resolves against its own folder, not the cwd
    resolved = check_det_dataset(str(world / "yolo" / "data.yaml"))
    assert Path(resolved["train"]) == (world / "yolo" / "images" / "train").resolve()
    assert resolved["nc"] == len(CLASS_NAMES)


def _property_labels(path: Path) -> dict[str, str]:
    with open(path, encoding="utf-8", newline="") as f:
        return {r["pid"]: r["label"] for r in csv.DictReader(f, delimiter="\t")}


def test_relations_tsv_lists_the_world_relations_first_with_real_pids(world):
    from pipeline.relations import SNAPSHOT, read_snapshot

    rows = [line.split("\t") for line in (world / "relations.tsv").read_text().splitlines()]
    assert rows[0] == ["pid", "label"]
    body = [tuple(r) for r in rows[1:]]
    assert body[: len(RULES)] == [(r.pid, r.label) for r in RULES]
    assert 20 <= len(body) <= 30 and len({p for p, _ in body}) == len(body)
    assert sorted((p.pid, p.label) for p in read_snapshot(world / "relations.tsv")) == sorted(body)
    item_relations = _property_labels(SNAPSHOT)  # the bundled WikibaseItem snapshot
    assert all(item_relations.get(pid) == label for pid, label in body)
    full = SHARED_DATA / "wikidata" / "wikidata_properties.tsv"
    if full.is_file():
        with open(full, encoding="utf-8", newline="") as f:
            props = {r["pid"]: r for r in csv.DictReader(f, delimiter="\t")}
        for pid, label in body:
            assert props[pid]["label"] == label and props[pid]["datatype"] == "WikibaseItem"


# ----------------------------------------------------------------------------- MNER, MRE


def _truth_by_image(root: Path) -> dict[str, dict]:
    return {Path(t["image"]).stem: t for t in _jsonl(root / "truth.jsonl")}


def test_mner_files_parse_and_image_dependent_types_match_the_key_object(world):
    meta = _meta(world)
    ambiguous = set(meta["ambiguous_names"])
    truth = _truth_by_image(world / "mner")
    name_types = defaultdict(set)
    train_types = defaultdict(set)
    for split, size in zip(("train", "dev", "test"), ARGS["mner"], strict=True):
        sentences = read_ner(world / "mner" / f"{split}.txt")
        assert len(sentences) == size
        dependent = 0
        type_counts = Counter()
        for s in sentences:
            assert find_image(world / "mner" / "images", s.img_id) is not None
            assert {lab[2:] for lab in s.labels if lab != "O"} <= {"PER", "LOC", "ORG", "MISC"}
            spans = [i for i, lab in enumerate(s.labels) if lab.startswith("B-")]
            amb = [i for i in spans if s.tokens[i] in ambiguous]
            dependent += bool(amb)
            keys = [c for c in truth[s.img_id]["classes"] if c in MNER_KEY_CLASS.values()]
            for i in amb:
                etype = s.labels[i][2:]
                type_counts[etype] += 1
                name_types[s.tokens[i]].add(etype)
                if split == "train":
                    train_types[s.tokens[i]].add(etype)
                assert keys == [MNER_KEY_CLASS[etype]], (split, s.tokens)
        assert dependent == size // 2
        assert max(type_counts.values()) - min(type_counts.values()) <= 1
    assert set(name_types) == ambiguous
    assert all(types == {"PER", "LOC", "ORG", "MISC"} for types in train_types.values())
    # test_image_dependent.jsonl lists exactly the ambiguous spans of the test sentences
    test = read_ner(world / "mner" / "test.txt")
    listed = _jsonl(world / "mner" / "test_image_dependent.jsonl")
    assert [r["index"] for r in listed] == list(range(len(test)))
    for row, s in zip(listed, test, strict=True):
        expected = [
            [i, i + 1, s.labels[i][2:]]
            for i, t in enumerate(s.tokens)
            if t in ambiguous and s.labels[i].startswith("B-")
        ]
        assert row["spans"] == expected


def test_mre_files_parse_and_the_image_settles_dependent_labels(world):
    rel2id = load_rel2id(world / "mre" / "rel2id.json")
    assert list(rel2id) == list(MRE_LABELS) and rel2id["None"] == 0
    ambiguous = set(_meta(world)["ambiguous_names"])
    truth = _truth_by_image(world / "mre")
    for split, size in zip(("train", "dev", "test"), ARGS["mre"], strict=True):
        samples = read_mnre(world / "mre" / f"{split}.txt", rel2id)
        assert len(samples) == size
        dependent = [s for s in samples if s.tail.name in ambiguous]
        assert len(dependent) == size // 2
        for s in samples:
            assert find_image(world / "mre" / "images", s.img_id) is not None
            assert s.tokens[s.head.start : s.head.end] == s.head.name.split()
            assert s.tokens[s.tail.start : s.tail.end] == s.tail.name.split()
        for s in dependent:
            relations = truth[Path(s.img_id).stem]["relations"]
            assert len(relations) == 1
            assert s.relation == MRE_FROM_RELATION.get(relations[0], "None")
        assert len({s.relation for s in dependent}) == min(4, len(dependent))
    test = read_mnre(world / "mre" / "test.txt", rel2id)
    listed = _jsonl(world / "mre" / "test_image_dependent.jsonl")
    assert [r["index"] for r in listed] == list(range(len(test)))
    assert [r["image_dependent"] for r in listed] == [s.tail.name in ambiguous for s in test]


# ----------------------------------------------------------------------------- nouns, CLI


def test_spacy_miner_finds_every_class_noun(world, tmp_path):
    from pipeline.nouns import mine_nouns
    from pipeline.prepare import prepare
    from pipeline.readers import read_source

    prepare(read_source("world", str(world)), tmp_path / "p", progress=False)
    doc = mine_nouns(tmp_path / "p" / "pairs.parquet", tmp_path / "e.json", m=200, progress=False)
    names = [e["name"] for e in doc["entities"]]
    assert set(CLASS_NAMES) <= set(names), set(CLASS_NAMES) - set(names)


def test_cli_builds_a_world_and_prepare_reads_it(tmp_path, monkeypatch):
    from pipeline.cli import app

    monkeypatch.chdir(tmp_path)
    sizes = ["--n", "6", "--n-adapt", "8", "--image-size", "64", "--no-progress"]
    for split in ("mner", "mre"):
        sizes += [f"--{split}-train", "2", f"--{split}-dev", "1", f"--{split}-test", "2"]
    res = CliRunner().invoke(app, ["synth-world", "--out", "w", "--seed", "5", *sizes])
    assert res.exit_code == 0, res.output
    assert "synth-world: " in res.output and "mner/" in res.output
    assert _meta(tmp_path / "w")["args"]["n"] == 6
    res = CliRunner().invoke(
        app, ["prepare", "--source", "world", "--input", "w/adapt", "--out", "p", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["n_rejected"] == 0 and summary["by_source"]["world"]["matched"] == 8
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    res = CliRunner().invoke(app, ["synth-world", "--out", "busy", *sizes])
    assert res.exit_code == 2 and "not a world folder" in res.output
