"""Readers: sample, NewsCLIPpings + VisualNews, parquet/CSV/JSONL tables, WebDataset tars."""

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import images
from pipeline import prepare as prep
from pipeline.images import decode_rgb, read_image_bytes
from pipeline.readers import read_source
from pipeline.readers.newsclippings import read_newsclippings
from pipeline.readers.sample import read_sample
from pipeline.readers.tabular import Columns, read_table
from pipeline.readers.webdataset_tars import read_wds
from pmu.errors import InputError


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, "JPEG")
    return buf.getvalue()


def test_sample_reader_lists_real_images_and_mismatches():
    records = list(read_sample())
    assert len(records) == 27 and len({r.id for r in records}) == 27
    assert sum(r.itm == 0 for r in records) == 10
    images_used = {r.image_path for r in records}
    assert len(images_used) == 17
    for path in images_used:
        assert decode_rgb(read_image_bytes(path)).mode == "RGB"
    assert all(r.caption and r.source == "sample" for r in records)


def test_sample_is_small_and_documented():
    from pipeline.readers.sample import SAMPLE_DIR

    total = sum(f.stat().st_size for f in SAMPLE_DIR.rglob("*") if f.is_file())
    assert total < 3 * 1024 * 1024
    sources = (SAMPLE_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for jpg in (SAMPLE_DIR / "images").glob("*.jpg"):
        assert f"| {jpg.name} |" in sources


def test_newsclippings_resolves_ids_against_visualnews(tmp_path):
    root = tmp_path / "visual_news"
    (root / "bbc" / "images").mkdir(parents=True)
    (root / "bbc" / "images" / "1.jpg").write_bytes(_jpeg())
    (root / "bbc" / "images" / "2.jpg").write_bytes(_jpeg((0, 0, 200)))
    data = [
        {"id": 1, "image_path": "./bbc/images/1.jpg", "caption": "Caption one.", "source": "bbc"},
        {"id": 2, "image_path": "./bbc/images/2.jpg", "caption": "Caption two.", "source": "bbc"},
    ]
    (root / "data.json").write_text(json.dumps(data))
    ann = {
        "annotations": [
            {"id": 1, "image_id": 1, "similarity_score": 0.9, "falsified": False},
            {"id": 1, "image_id": 2, "similarity_score": 0.7, "falsified": True},
            {"id": 99, "image_id": 2, "similarity_score": 0.1, "falsified": True},
        ]
    }
    (tmp_path / "val.json").write_text(json.dumps(ann))
    recs = list(read_newsclippings(tmp_path / "val.json", root / "data.json"))
    assert [r.id for r in recs] == ["ncp-1-1", "ncp-1-2", "ncp-99-2"]
    assert [r.itm for r in recs] == [1, 0, 0]
    assert recs[1].caption == "Caption one." and recs[1].image_path.endswith("bbc/images/2.jpg")
    assert recs[2].problem == "newsclippings: caption id not in data.json"
    # An explicit image root wins over data.json's folder.
    other = list(read_newsclippings(tmp_path / "val.json", root / "data.json", tmp_path / "x"))
    assert other[0].image_path == str(tmp_path / "x" / "bbc/images/1.jpg")
    out = tmp_path / "p"
    result = prep.prepare(
        read_source("newsclippings", str(tmp_path / "val.json"), None, str(root / "data.json")),
        out,
        progress=False,
    )
    assert result.counts()["by_source"] == {"newsclippings": {"matched": 1, "mismatched": 1}}
    assert result.n_negatives == 0  # the source has mismatched pairs of its own


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_tables_with_custom_columns_and_image_root(tmp_path, fmt):
    imgs = tmp_path / "images"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(_jpeg())
    rows = [
        {"key": "k1", "file": "a.jpg", "text": "First caption.", "match": 1},
        {"key": "k2", "file": str(imgs / "a.jpg"), "text": "Second caption.", "match": 0},
    ]
    table = tmp_path / "sub" / f"t.{fmt}"
    table.parent.mkdir()
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), table)
    elif fmt == "csv":
        lines = ["key,file,text,match"] + [",".join(str(v) for v in r.values()) for r in rows]
        table.write_text("\n".join(lines) + "\n")
    else:
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cols = Columns(id="key", image="file", caption="text", itm="match")
    recs = list(read_table(table, cols, image_root=imgs))
    assert [(r.id, r.caption, r.itm) for r in recs] == [
        ("k1", "First caption.", 1),
        ("k2", "Second caption.", 0),
    ]
    assert recs[0].image_path == str(imgs / "a.jpg")
    assert recs[1].image_path == str(imgs / "a.jpg")  # absolute paths are kept
    # Without --image-root relative paths resolve against the table's folder.
    assert list(read_table(table, cols))[0].image_path == str(table.parent / "a.jpg")


def test_table_without_id_column_and_bad_rows(tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text(
        '{"image_path": "a.jpg", "caption": "x"}\nnot json\n[1, 2]\n'
        '{"image_path": "a.jpg", "caption": "y", "itm": 5}\n'
    )
    recs = list(read_table(table))
    assert recs[0].id == "t-00000000" and recs[0].problem is None
    assert recs[1].problem.startswith("table: invalid JSON line")
    assert recs[2].problem == "table: JSON line is not an object"
    assert recs[3].problem.startswith("table: itm must be 0 or 1")
    with pytest.raises(InputError, match="unknown table format '.xlsx'"):  # was a ValueError
        list(read_table(tmp_path / "t.xlsx"))


def _add(tar, name, payload: bytes, **kw):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(payload))


def test_webdataset_tars_group_members_and_reject_unsafe_ones(tmp_path):
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        _add(tar, "000000001.jpg", _jpeg())
        _add(tar, "000000001.txt", b"A red square on a table.")
        _add(tar, "000000001.json", json.dumps({"key": "000000001", "status": "success"}).encode())
        _add(tar, "000000002.jpg", _jpeg((1, 2, 3)))
        _add(tar, "000000002.txt", b"caf\xe9")  # not UTF-8
        _add(tar, "../../etc/evil.jpg", _jpeg())
        _add(tar, "000000003.pyd", b"\x80\x04pickle")
        link = tarfile.TarInfo("000000004.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _add(tar, "000000005.txt", b"caption without an image")
        _add(tar, "000000006.jpg", _jpeg())  # no caption
    recs = {r.id: r for r in read_wds(tmp_path)}
    assert recs["000000001"].caption == "A red square on a table."
    assert recs["000000001"].image_path == f"{tar_path}::000000001.jpg"
    assert recs["000000002"].caption == b"caf\xe9"
    assert recs["../../etc/evil.jpg"].problem == "wds: unsafe tar member (unsafe path)"
    assert recs["000000003.pyd"].problem == "wds: unsafe tar member (pickle member)"
    assert recs["000000004.jpg"].problem == "wds: unsafe tar member (not a regular file)"
    assert recs["000000005"].problem == "wds: no image member"
    out = tmp_path / "p"
    prep.prepare(read_wds(tar_path), out, negatives=False, progress=False)
    pairs = pq.read_table(out / prep.PAIRS_FILE).to_pylist()
    assert [p["id"] for p in pairs] == ["000000001"]
    assert (pairs[0]["width"], pairs[0]["height"]) == (32, 24)
    reasons = {
        json.loads(line)["id"]: json.loads(line)["reason"]
        for line in (out / prep.REJECTED_FILE).read_text().splitlines()
    }
    assert reasons["000000002"] == prep.CAPTION_NOT_UTF8
    assert reasons["000000006"] == prep.CAPTION_MISSING
    assert reasons["000000005"] == "wds: no image member"
    assert reasons["../../etc/evil.jpg"] == "wds: unsafe tar member"
    assert not os.path.exists(tmp_path.parent / "etc" / "evil.jpg")


def test_wds_image_member_that_is_truncated(tmp_path):
    data = _jpeg()
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        _add(tar, "k.jpg", data[: len(data) // 2])
        _add(tar, "k.txt", b"caption")
    out = tmp_path / "p"
    prep.prepare(read_wds(tmp_path / "a.tar"), out, negatives=False, progress=False)
    rejected = json.loads((out / prep.REJECTED_FILE).read_text())
    assert rejected["reason"] == images.TRUNCATED and rejected["stage"] == "image"
