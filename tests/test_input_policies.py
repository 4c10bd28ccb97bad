"""Bad inputs that used to break a run: each is now a recorded rejection with its reason, and the
rest of the run goes on (huge CSV captions, non-text image paths, itm other than 0/1, ids that
share a shard key, image paths that leave the image root)."""

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import prepare as prep
from pipeline.cli import app
from pipeline.readers import read_source
from pipeline.readers.records import IMAGE_OUTSIDE_ROOT, image_under_root
from pipeline.readers.rows import parse_itm
from pipeline.readers.tabular import read_table
from pmu.shards import sample_key


def _jpeg(path, color=(10, 120, 200)):
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, "JPEG")
    path.write_bytes(buf.getvalue())


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        _jpeg(root / f"{i}.jpg", (i * 80, 10, 10))
    return root


def _run(records, out):
    result = prep.prepare(records, out, negatives=False, progress=False)
    rejected = [json.loads(x) for x in (out / prep.REJECTED_FILE).read_text().splitlines()]
    kept = pq.read_table(out / prep.PAIRS_FILE).column("id").to_pylist()
    return result, {r["id"]: r for r in rejected}, kept


def test_a_1mb_csv_caption_is_rejected_and_the_rest_kept(tmp_path, images):
    table = tmp_path / "t.csv"
    huge = "word " * 220_000  # 1.1 MB, above the csv module's 128 KiB field limit
    table.write_text(
        "id,image_path,caption\n"
        f'a,imgs/0.jpg,First.\nhuge,imgs/1.jpg,"{huge}"\nb,imgs/2.jpg,Last.\n',
        encoding="utf-8",
    )
    _, rejected, kept = _run(read_table(table), tmp_path / "p")
    assert kept == ["a", "b"]
    assert rejected["huge"]["reason"] == prep.CAPTION_TOO_LONG
    assert rejected["huge"]["detail"] == "1099999 > 100000 characters"  # after strip()


@pytest.mark.parametrize("value", [7, 1.5, ["imgs/0.jpg"], True, {"p": "imgs/0.jpg"}])
def test_non_text_image_paths_in_jsonl_are_rejected(tmp_path, images, value):
    rows = [
        {"id": "bad", "image_path": value, "caption": "x"},
        {"id": "good", "image_path": "imgs/0.jpg", "caption": "y"},
    ]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, rejected, kept = _run(read_table(table), tmp_path / "p")
    assert kept == ["good"]
    assert rejected["bad"]["reason"] == "table: image path is not text"
    assert rejected["bad"]["detail"] == type(value).__name__
    assert rejected["bad"]["stage"] == "read"


def test_non_text_ids_are_rejected_and_integers_kept(tmp_path, images):
    rows = [
        {"id": 5, "image_path": "imgs/0.jpg", "caption": "integer id"},
        {"id": [1], "image_path": "imgs/1.jpg", "caption": "list id"},
        {"id": False, "image_path": "imgs/2.jpg", "caption": "bool id"},
    ]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, rejected, kept = _run(read_table(table), tmp_path / "p")
    assert kept == ["5"]
    assert {r["reason"] for r in rejected.values()} == {"table: id is not text or an integer"}


ACCEPTED_ITM = [(0, 0), (1, 1), ("0", 0), ("1", 1), (" 1 ", 1), (1.0, 1), ("1.0", 1), (0.0, 0)]
REFUSED_ITM = [0.5, 1.9, 2, -1, "0.5", "1.9", "yes", "true", True, False, [1]]


def test_itm_must_be_exactly_0_or_1():
    assert [parse_itm(v) for v, _ in ACCEPTED_ITM] == [want for _, want in ACCEPTED_ITM]
    assert [parse_itm(v) for v in REFUSED_ITM] == [None] * len(REFUSED_ITM)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_itm_other_than_0_or_1_is_rejected_not_truncated(tmp_path, images, fmt):
    values = {"half": 0.5, "nearly-two": 1.9, "text-half": "0.5", "one": 1, "zero": "0", "none": ""}
    rows = [
        {"id": k, "image_path": "imgs/0.jpg", "caption": k, "itm": v} for k, v in values.items()
    ]
    table = tmp_path / f"t.{fmt}"
    if fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["id,image_path,caption,itm"]
        lines += [f"{r['id']},{r['image_path']},{r['caption']},{r['itm']}" for r in rows]
        table.write_text("\n".join(lines) + "\n")
    _, rejected, kept = _run(read_table(table), tmp_path / "p")
    assert sorted(kept) == ["none", "one", "zero"]
    assert set(rejected) == {"half", "nearly-two", "text-half"}
    assert {r["reason"] for r in rejected.values()} == {"table: itm must be 0 or 1"}
    itm = dict(zip(*pq.read_table(tmp_path / "p" / prep.PAIRS_FILE, columns=["id", "itm"])
                   .to_pydict().values(), strict=True))  # fmt: skip
    assert itm == {"one": 1, "zero": 0, "none": 1}


def test_ids_that_share_a_shard_key_are_refused_at_prepare(tmp_path, images):
    clash = sample_key("k/1")  # `k/1` is sanitised to `k_1_<sha1>`: a valid id of its own
    assert clash != "k/1" and sample_key(clash) == clash
    rows = [
        {"id": "k/1", "image_path": "imgs/0.jpg", "caption": "first"},
        {"id": clash, "image_path": "imgs/1.jpg", "caption": "second"},
        {"id": "k/1", "image_path": "imgs/2.jpg", "caption": "third"},
    ]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, _, kept = _run(read_table(table), tmp_path / "p")
    assert kept == ["k/1"]
    reasons = [(r.id, r.reason, r.detail) for r in result.rejected]
    assert reasons == [
        (clash, prep.DUPLICATE_KEY, f"same shard key {clash!r} as id 'k/1'"),
        ("k/1", prep.DUPLICATE_ID, ""),
    ]
    # Chunked and resumed runs see the same keys (the key table carries across chunks).
    chunked = prep.prepare(read_table(table), tmp_path / "c", chunk_size=1, progress=False)
    assert [r.reason for r in chunked.rejected] == [prep.DUPLICATE_KEY, prep.DUPLICATE_ID]


def test_negative_ids_never_take_an_existing_shard_key():
    pairs = [
        prep.Pair("a/b", "t", "1.jpg", "one", 1, 8, 8),
        prep.Pair(sample_key("a/b-neg"), "t", "2.jpg", "two", 1, 8, 8),
    ]
    negatives = prep.make_negatives(pairs, seed=0)
    keys = [sample_key(p.id) for p in pairs + negatives]
    assert len(keys) == len(set(keys)) and len(negatives) == 2


def test_image_under_root():
    assert image_under_root("a/b.jpg", "/data") == ("/data/a/b.jpg", None)
    assert image_under_root("/data/x.jpg", "/data") == ("/data/x.jpg", None)
    path, problem = image_under_root("../etc/passwd", "/data")
    assert path is None and problem.startswith(IMAGE_OUTSIDE_ROOT)
    path, problem = image_under_root("/etc/passwd", "/data")
    assert path is None and problem.startswith(IMAGE_OUTSIDE_ROOT)
    assert image_under_root("a/../../etc/x", "/data")[1] is not None
    assert image_under_root("../etc/passwd", "/data", allow_outside=True) == (
        "/data/../etc/passwd",
        None,
    )


def test_paths_leaving_the_image_root_are_refused_unless_allowed(tmp_path, images):
    outside = tmp_path / "secret.jpg"
    _jpeg(outside)
    rows = [
        {"id": "inside", "image_path": "0.jpg", "caption": "ok"},
        {"id": "dotdot", "image_path": "../secret.jpg", "caption": "escapes"},
        {"id": "absolute", "image_path": str(outside), "caption": "elsewhere"},
        {"id": "abs-inside", "image_path": str(images / "1.jpg"), "caption": "ok too"},
    ]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = read_source("table", str(table), str(images))
    _, rejected, kept = _run(source, tmp_path / "p")
    assert kept == ["inside", "abs-inside"]
    assert {k: r["reason"] for k, r in rejected.items()} == {
        "dotdot": IMAGE_OUTSIDE_ROOT,
        "absolute": IMAGE_OUTSIDE_ROOT,
    }
    assert rejected["dotdot"]["stage"] == "read" and "../secret.jpg" in rejected["dotdot"]["detail"]
    allowed = read_source("table", str(table), str(images), allow_outside_root=True)
    _, rejected, kept = _run(allowed, tmp_path / "q")
    assert kept == ["inside", "dotdot", "absolute", "abs-inside"] and not rejected

    args = ["prepare", "--source", "table", "--input", table, "--image-root", images]
    args += ["--negatives", "false", "--no-progress"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--out", tmp_path / "cli"]])
    assert result.exit_code == 0 and f"2  {IMAGE_OUTSIDE_ROOT}" in result.output
    result = CliRunner().invoke(
        app, [str(a) for a in [*args, "--out", tmp_path / "cli2", "--allow-outside-root"]]
    )
    assert result.exit_code == 0 and "4 pairs" in result.output


def test_sample_and_newsclippings_readers_keep_to_their_root(tmp_path):
    sample = tmp_path / "sample"
    (sample / "images").mkdir(parents=True)
    _jpeg(sample / "images" / "a.jpg")
    _jpeg(tmp_path / "outside.jpg")
    lines = [
        {"id": "in", "image": "images/a.jpg", "caption": "fine", "itm": 1},
        {"id": "out", "image": "../outside.jpg", "caption": "escapes"},
        {"id": "half", "image": "images/a.jpg", "caption": "bad itm", "itm": 0.5},
    ]
    (sample / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = {r.id: r for r in read_source("sample", str(sample))}
    assert recs["in"].problem is None
    assert recs["out"].problem.startswith(IMAGE_OUTSIDE_ROOT)
    assert recs["half"].problem.startswith("sample: itm must be 0 or 1")

    root = tmp_path / "vn"
    root.mkdir()
    data = [{"id": 1, "image_path": "./../outside.jpg", "caption": "c"}]
    (root / "data.json").write_text(json.dumps(data))
    (tmp_path / "ann.json").write_text(json.dumps([{"id": 1, "image_id": 1}]))
    (rec,) = read_source("newsclippings", str(tmp_path / "ann.json"), None, str(root / "data.json"))
    assert rec.problem.startswith(IMAGE_OUTSIDE_ROOT) and rec.image_path is None
