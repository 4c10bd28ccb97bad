"""Hostile inputs a review found (issue 22): each now stops with a short error (exit 2) or
rejects only what is broken, with a reason, and keeps the rest.

Built from tiny files made here; `prepare` runs as the user runs it (a subprocess) where the
exit code is the point, else as a plain function. The classes and where each is tested:
- columns not what the reader expects; duplicate headers; mis-split CSV rows; wrong types
  coerced; partial files (truncated tars, cut img2dataset shards, damaged parquet); a limit that
  rejected real (long) captions: here;
- two writers on one output, a SIGKILL'd writer's lock, unwritable outputs: tests/test_outputs.py
  (real processes);
- `--resume` on another run's state: tests/test_pretrain.py (`..._refuses_...`);
- tracebacks where a one-line error belongs: sizes.json counts (tests/test_verify.py,
  tests/test_trainer_cli.py), shards with no valid sample (tests/test_trainer_cli.py), a dev
  label train lacks and empty fine-tuning files (tests/test_finetune.py);
- demo settings applied to real data: tests/test_trainer_cli.py
  (`test_in_the_repo_a_plain_run_gets_the_real_recipe`, and the DVC stages' settings).
"""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import images
from pipeline import prepare as prep
from pipeline.images import ImageRejected, read_image_bytes
from pipeline.readers.newsclippings import read_newsclippings
from pipeline.readers.tabular import read_table
from pipeline.readers.webdataset_tars import read_wds

REPO = Path(__file__).resolve().parents[1]


def _jpeg_bytes(color=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """A folder with three tiny images, 0.jpg to 2.jpg."""
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg_bytes((i * 80, 10, 10)))
    return tmp_path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "pipeline", "prepare", "--no-progress", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _error_line(res: subprocess.CompletedProcess) -> str:
    """The `error:` line of a run that stopped as expected: exit 2, one short error line (and
    at most one hint line), no traceback."""
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and 1 <= len(lines) <= 2, res.stderr
    assert lines[0].startswith("error: ") and all(len(line) < 300 for line in lines)
    return lines[0]


def _prepared(out: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({rejected id: rejection}, {kept id: caption}) of a prepare output folder."""
    lines = (out / prep.REJECTED_FILE).read_text().splitlines()
    rejected = {r["id"]: r for r in map(json.loads, lines)}
    kept = {r["id"]: r["caption"] for r in pq.read_table(out / prep.PAIRS_FILE).to_pylist()}
    return rejected, kept


def _run(records, out: Path):
    result = prep.prepare(records, out, negatives=False, progress=False)
    return (result, *_prepared(out))


ROWS = [{"file": f"{i}.jpg", "text": f"Caption {i}."} for i in range(3)]


def _write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        names = list(rows[0])
        lines = [",".join(names)] + [",".join(str(r[n]) for n in names) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


# 1. No usable image or caption column: stop, naming the columns found and the options.
@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_table_without_the_columns_stops_naming_the_columns_it_has(folder, suffix):
    table = _write_table(folder / f"t{suffix}", ROWS)
    out = folder / "out"
    line = _error_line(_cli("--source", "table", "--input", table, "--out", out))
    assert "has no column 'image_path'" in line and "'file', 'text'" in line
    assert not out.exists()
    mapped = _cli("--source", "table", "--input", table, "--out", out, "--image-col", "file")
    assert "has no column 'caption'" in _error_line(mapped)
    ok = _cli(*["--source", "table", "--input", table, "--out", out, "--negatives", "false"],
              *["--image-col", "file", "--caption-col", "text"])  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    _, kept = _prepared(out)
    assert kept == {f"t-{i:08d}": f"Caption {i}." for i in range(3)}  # no id column: row ids


def test_a_named_id_or_itm_column_that_is_absent_stops(folder):
    table = _write_table(folder / "t.csv", ROWS)
    base = ["--source", "table", "--input", table, "--out", folder / "out"]
    base += ["--image-col", "file", "--caption-col", "text"]
    res = _cli(*base, "--id-col", "uid")
    assert "has no column 'uid'" in _error_line(res) and "--id-col" in res.stderr
    res = _cli(*base, "--itm-col", "match")
    assert "has no column 'match'" in _error_line(res) and "--itm-col" in res.stderr


# 2. A CSV header that names a column twice: which one is meant cannot be known.
def test_csv_duplicate_header_stops_naming_the_column(folder):
    table = folder / "t.csv"
    table.write_text("id,image_path,caption,caption\na,0.jpg,One.,Two.\n")
    line = _error_line(_cli("--source", "table", "--input", table, "--out", folder / "out"))
    assert line.endswith("repeats the column 'caption'")


# 3. CSV rows with more or fewer fields than the header are rejected, not cut or padded.
def test_csv_rows_with_extra_or_missing_fields_are_rejected(folder):
    table = folder / "t.csv"
    table.write_text(
        "id,image_path,caption,itm\n"
        "a,0.jpg,A dog,1\n"
        "b,1.jpg,A dog, on a beach,1\n"  # unquoted comma: five fields
        "c,2.jpg,A cat\n"  # three fields: its itm would silently become 1
        'd,2.jpg,"A cat, quoted",0\n'
    )
    _, rejected, kept = _run(read_table(table), folder / "out")
    assert kept == {"a": "A dog", "d": "A cat, quoted"}
    assert {r["reason"] for r in rejected.values()} == {"table: wrong number of fields"}
    assert rejected["t-00000001"]["detail"] == "row has 5 fields, the header has 4"
    assert rejected["t-00000002"]["detail"] == "row has 3 fields, the header has 4"


# 4. Values of the wrong type are rejected, never coerced.
def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A WebDataset tar: per key its members (`jpg`, `txt`, `json`), adjacent, in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, payload in members.items():
                _add(tar, f"{key}.{ext}", payload)
    return path


def _sample(caption: str, meta: bytes | None = None) -> dict[str, bytes]:
    members = {"jpg": _jpeg_bytes(), "txt": caption.encode()}
    return members if meta is None else {**members, "json": meta}


def test_unparsable_wds_json_and_text_flags_are_rejected(tmp_path):
    tar = _shard(
        tmp_path / "s.tar",
        {
            "good": _sample("Kept.", b'{"itm": 0}'),
            "broken": _sample("Its itm 0 must not become 1.", b'{"itm": 0,'),
            "listed": _sample("Not an object.", b"[0]"),
            "word": _sample("A flag in words.", b'{"itm": "false"}'),
            "yes": _sample("A flag in words.", b'{"itm": "yes"}'),
            "text-one": _sample("Text holding 1 is fine.", b'{"itm": "1"}'),
        },
    )
    _, rejected, kept = _run(read_wds(tar), tmp_path / "out")
    assert set(kept) == {"good", "text-one"}
    reasons = {k: (r["reason"], r["detail"]) for k, r in rejected.items()}
    assert reasons["broken"] == ("wds: bad JSON", "Expecting property name enclosed in "
                                 "double quotes at byte 10")  # fmt: skip
    assert reasons["listed"] == ("wds: JSON is not an object", "list")
    assert reasons["word"] == ("wds: itm must be 0 or 1", "got 'false'")
    assert reasons["yes"] == ("wds: itm must be 0 or 1", "got 'yes'")
    itms = {
        r["id"]: r["itm"] for r in pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    }
    assert itms == {"good": 0, "text-one": 1}


def test_newsclippings_falsified_in_words_is_refused(tmp_path):
    (tmp_path / "0.jpg").write_bytes(_jpeg_bytes())
    data = {str(i): {"caption": f"Caption {i}.", "image_path": "./0.jpg"} for i in range(3)}
    (tmp_path / "data.json").write_text(json.dumps(data))
    anns = [
        {"id": 0, "image_id": 1, "falsified": True},
        {"id": 1, "image_id": 2, "falsified": "false"},
    ]
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": anns}))
    records = read_newsclippings(tmp_path / "ann.json", tmp_path / "data.json")
    _, rejected, kept = _run(records, tmp_path / "out")
    assert list(kept) == ["ncp-0-1"]
    assert rejected["ncp-1-2"]["reason"] == "newsclippings: falsified must be true or false"
    assert rejected["ncp-1-2"]["detail"] == "'false'"  # truthiness would have made it itm 0


# 5. A tar cut short keeps every complete sample before the cut.
def _three_samples(path: Path) -> tuple[bytes, list[tarfile.TarInfo]]:
    _shard(path, {f"{i:04d}": _sample(f"Sample {i}.", b'{"itm": 1}') for i in range(3)})
    with tarfile.open(path) as tar:
        return path.read_bytes(), tar.getmembers()


def test_a_tar_cut_inside_its_last_sample_keeps_the_samples_before(tmp_path):
    data, members = _three_samples(tmp_path / "full.tar")
    last_jpg = members[6]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "cut.tar").write_bytes(data[: last_jpg.offset_data + last_jpg.size // 2])
    out = tmp_path / "out"
    res = _cli("--source", "wds", "--input", shards, "--out", out, "--negatives", "false")
    assert res.returncode == 0, res.stderr
    rejected, kept = _prepared(out)
    assert kept == {"0000": "Sample 0.", "0001": "Sample 1."}
    assert rejected["cut.tar:0002"]["reason"] == "wds: truncated tar"
    assert rejected["cut.tar:0002"]["detail"] == "unexpected end of data, at sample 0002"
    assert read_image_bytes(f"{shards / 'cut.tar'}::0001.jpg") == _jpeg_bytes()
    with pytest.raises(ImageRejected, match="'0002.jpg' is cut short") as cut:
        read_image_bytes(f"{shards / 'cut.tar'}::0002.jpg")  # the image index keeps the rest
    assert cut.value.reason == images.TRUNCATED


def test_a_shard_cut_between_members_by_a_failed_download_keeps_its_complete_samples(tmp_path):
    data, members = _three_samples(tmp_path / "full.tar")
    json_of_1 = members[5]  # the cut falls just before sample 0001's json (itm could be 0)
    (tmp_path / "cut.tar").write_bytes(data[: json_of_1.offset])
    _, rejected, kept = _run(read_wds(tmp_path / "cut.tar"), tmp_path / "out")
    assert kept == {"0000": "Sample 0."}
    assert rejected["cut.tar:0001"]["reason"] == "wds: truncated tar"
    assert rejected["cut.tar:0001"]["detail"].startswith("no end-of-archive block at byte")


# 6. A damaged parquet page rejects the rows it holds, not the run.
def test_a_corrupt_parquet_page_rejects_its_row_group_and_keeps_the_rest(folder):
    rows = [{"id": f"r{i}", "image_path": f"{i % 3}.jpg", "caption": f"Row {i}."} for i in range(9)]
    table = folder / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=3, use_dictionary=False)
    chunk = pq.ParquetFile(table).metadata.row_group(1).column(2)  # captions of rows 3-5
    data = bytearray(table.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size * 3 // 4  # compressed values
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    table.write_bytes(bytes(data))
    out = folder / "out"
    res = _cli("--source", "table", "--input", table, "--out", out, "--negatives", "false")
    assert res.returncode == 0, res.stderr
    rejected, kept = _prepared(out)
    assert list(kept) == ["r0", "r1", "r2", "r6", "r7", "r8"]
    assert list(rejected) == [f"t-{i:08d}" for i in (3, 4, 5)]
    assert {r["reason"] for r in rejected.values()} == {"table: unreadable parquet data"}
    assert all(r["detail"].startswith("row group 1: ") for r in rejected.values())


# 7. Long real captions are cut like a tokenizer would; only non-captions are rejected.
def test_long_captions_are_cut_at_a_word_and_only_junk_is_rejected(folder):
    long_text = "A long but real caption about a harbour at dawn. " * 100  # 5,000 characters
    rows = [
        {"id": "long", "image_path": "0.jpg", "caption": long_text},
        {"id": "short", "image_path": "1.jpg", "caption": "A short caption."},
        {"id": "huge", "image_path": "2.jpg", "caption": "word " * 20_001},
        {"id": "digits", "image_path": "2.jpg", "caption": "1234 5678 !!"},
        {"id": "binary", "image_path": "2.jpg", "caption": "ab\x00\x01\x02cd"},
        {"id": "form-feed", "image_path": "2.jpg", "caption": "Page one.\x0cPage two."},
    ]
    result, rejected, kept = _run(read_table(_write_table(folder / "t.jsonl", rows)), folder / "p")
    assert set(kept) == {"long", "short", "form-feed"}
    assert len(kept["long"]) <= prep.DEFAULT_MAX_CAPTION_CHARS
    assert long_text.startswith(kept["long"]) and kept["long"].endswith(" harbour")
    assert not long_text[len(kept["long"])].isalnum()  # cut between words, not inside one
    assert kept["short"] == "A short caption."
    assert {k: r["reason"] for k, r in rejected.items()} == {
        "huge": "caption: too long",
        "digits": "caption: no letters",
        "binary": "caption: binary data",
    }
    assert rejected["huge"]["detail"] == "100004 > 100000 characters"
    summary = json.loads((folder / "p" / prep.SUMMARY_FILE).read_text())
    assert summary["n_captions_truncated"] == result.n_truncated == 1
    assert prep.shorten_caption("one two three", 9) == ("one two", True)
    assert prep.shorten_caption("abcdefghij", 5) == ("abcde", True)  # one long word: a hard cut


def test_the_bundled_sample_has_no_caption_cut(tmp_path):
    res = _cli("--out", tmp_path / "p")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "p" / prep.SUMMARY_FILE).read_text())
    assert "n_captions_truncated" not in summary and summary["n_rejected"] == 0
