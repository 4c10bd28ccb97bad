"""`prepare --source hf`: datasets saved with `save_to_disk` (an Image feature, a path column,
a DatasetDict), validated like every other reader; hub names refused offline."""

import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import prepare as prep
from pipeline.cli import app
from pipeline.images import TRUNCATED, UNKNOWN_FORMAT
from pipeline.readers import read_source
from pipeline.readers.records import IMAGE_OUTSIDE_ROOT
from pipeline.readers.tabular import Columns
from pmu.errors import InputError

datasets = pytest.importorskip("datasets")  # a pinned dependency (pyproject.toml)


def _jpeg(color, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), color).save(buf, "PNG")
    return buf.getvalue()


GOOD = _jpeg((200, 10, 10))
TRUNCATED_JPEG = _jpeg((10, 200, 10), (300, 200))[:300]


@pytest.fixture
def image_dataset(tmp_path) -> Path:
    """An `Image` feature holding bytes: good, duplicate, PNG, broken, junk; one empty caption."""
    rows = {
        "uid": ["a", "b", "c", "d", "e", "f"],
        "img": [
            {"bytes": GOOD, "path": None},
            {"bytes": GOOD, "path": None},  # the same picture again: stored once
            {"bytes": _png((0, 0, 255, 128)), "path": None},
            {"bytes": TRUNCATED_JPEG, "path": None},
            {"bytes": b"not an image", "path": None},
            {"bytes": _jpeg((1, 2, 3)), "path": None},
        ],
        "text": ["A red square.", "The same red square.", "Blue glass.", "Cut off.", "Junk.", ""],
        "match": [1, 0, 1, 1, 1, 1],
    }
    features = datasets.Features(
        {
            "uid": datasets.Value("string"),
            "img": datasets.Image(),
            "text": datasets.Value("string"),
            "match": datasets.Value("int64"),
        }
    )
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


COLUMNS = Columns(id="uid", image="img", caption="text", itm="match")


def _prepare(source, out):
    result = prep.prepare(source, out, negatives=False, progress=False)
    rows = pq.read_table(out / prep.PAIRS_FILE).to_pylist()
    return result, rows, {r.id: r for r in result.rejected}


def test_image_feature_bytes_go_to_a_content_addressed_store(image_dataset, tmp_path):
    store = tmp_path / "out" / "images"
    source = read_source("hf", str(image_dataset), columns=COLUMNS, image_store=store)
    result, rows, rejected = _prepare(source, tmp_path / "out")
    by_id = {r["id"]: r for r in rows}  # prepare interleaves matched and mismatched pairs
    assert {k: r["itm"] for k, r in by_id.items()} == {"a": 1, "b": 0, "c": 1}
    assert all(r["source"] == "hf" for r in rows)
    digest = hashlib.sha256(GOOD).hexdigest()
    jpeg = str(store / digest[:2] / f"{digest}.jpg")
    assert by_id["a"]["image_path"] == by_id["b"]["image_path"] == jpeg
    assert by_id["c"]["image_path"].endswith(".png")
    assert (by_id["a"]["width"], by_id["a"]["height"]) == (32, 24)
    assert {k: (r.stage, r.reason) for k, r in rejected.items()} == {
        "d": ("image", TRUNCATED),
        "e": ("image", UNKNOWN_FORMAT),
        "f": ("caption", prep.CAPTION_EMPTY),
    }
    stored = sorted(p.name for p in store.rglob("*") if p.is_file())
    assert len(stored) == 5  # one file per distinct picture (the two red squares share one)
    for path in store.rglob("*.*"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem  # content-addressed


def test_path_column_resolves_against_the_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    (folder / "pics").mkdir(parents=True)
    (folder / "pics" / "1.jpg").write_bytes(GOOD)
    (tmp_path / "outside.jpg").write_bytes(GOOD)
    rows = {
        "image_path": ["pics/1.jpg", "pics/missing.jpg", "../outside.jpg", None, "pics/1.jpg"],
        "caption": ["fine", "gone", "escapes", "no image", "  "],
    }
    staging = tmp_path / "staging"
    datasets.Dataset.from_dict(rows).save_to_disk(str(staging))
    for item in staging.iterdir():  # saved beside its pictures, as datasets are shipped
        item.rename(folder / item.name)
    source = read_source("hf", str(folder), image_store=tmp_path / "store")
    result, kept, rejected = _prepare(source, tmp_path / "out")
    assert [r["id"] for r in kept] == ["ds-00000000"]  # no id column: folder name + row
    assert kept[0]["image_path"] == str(folder / "pics" / "1.jpg")
    assert {k: r.reason for k, r in rejected.items()} == {
        "ds-00000001": "image: missing file",
        "ds-00000002": IMAGE_OUTSIDE_ROOT,
        "ds-00000003": prep.IMAGE_NO_PATH,
        "ds-00000004": prep.CAPTION_EMPTY,
    }
    assert not (tmp_path / "store").exists()  # nothing held as bytes
    allowed = read_source(
        "hf", str(folder), image_store=tmp_path / "store", allow_outside_root=True
    )
    assert "ds-00000002" in [r["id"] for r in _prepare(allowed, tmp_path / "o2")[1]]


def test_splits_columns_and_hub_names_are_checked(image_dataset, tmp_path):
    ds = datasets.load_from_disk(str(image_dataset))
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(both))
    kw = dict(columns=COLUMNS, image_store=tmp_path / "s")
    assert len(list(read_source("hf", str(both), **kw))) == 6  # train by default
    assert len(list(read_source("hf", str(both), split="test", **kw))) == 1
    with pytest.raises(InputError, match="has no split 'dev'"):
        read_source("hf", str(both), split="dev", **kw)
    with pytest.raises(InputError, match="has no column 'image_path'") as err:
        read_source("hf", str(image_dataset), image_store=tmp_path / "s")
    assert "Image features: ['img']" in err.value.hint
    with pytest.raises(InputError, match="not a folder saved with save_to_disk"):
        read_source("hf", str(tmp_path), image_store=tmp_path / "s")
    with pytest.raises(InputError, match="the hub cannot be used .the offline switches are set"):
        read_source("hf", "someone/some-captions", image_store=tmp_path / "s")


def test_records_stream_without_reading_the_whole_dataset(image_dataset, tmp_path):
    store = tmp_path / "s"
    records = read_source("hf", str(image_dataset), columns=COLUMNS, image_store=store)
    first = next(records)
    assert first.id == "a" and len([p for p in store.rglob("*") if p.is_file()]) == 1


def test_cli_prepare_from_a_saved_dataset(image_dataset, tmp_path):
    out = tmp_path / "prepared"
    args = ["prepare", "--source", "hf", "--input", image_dataset, "--out", out]
    args += ["--id-col", "uid", "--image-col", "img", "--caption-col", "text", "--itm-col", "match"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--no-progress"]])
    assert result.exit_code == 0, result.output
    assert "3 pairs" in result.output and "3 rejected" in result.output
    pairs = pq.read_table(out / prep.PAIRS_FILE).to_pylist()
    assert all(Path(p["image_path"]).is_relative_to(out / "images") for p in pairs)
    summary = json.loads((out / prep.SUMMARY_FILE).read_text())
    assert summary["by_source"] == {"hf": {"matched": 2, "mismatched": 1}}
    first = (out / prep.PAIRS_FILE).read_bytes()
    again = CliRunner().invoke(app, [str(a) for a in [*args, "--no-progress"]])
    assert again.exit_code == 0 and (out / prep.PAIRS_FILE).read_bytes() == first  # same bytes
    wrong = CliRunner().invoke(app, [str(a) for a in [*args[:5], "--out", tmp_path / "x"]])
    assert wrong.exit_code == 2 and "has no column 'image_path'" in wrong.stderr
    assert not (tmp_path / "x").exists() and os.path.isdir(out)
