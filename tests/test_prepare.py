"""prepare: every bad-input case is rejected with its reason, good records survive, outputs
are deterministic, negatives are a seeded derangement."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import images
from pipeline import prepare as prep
from pipeline.cli import app
from pipeline.readers.sample import read_sample
from pipeline.readers.tabular import read_table
from pmu.errors import InputError


def _save(img: Image.Image, path, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _photo(seed: int = 0, w: int = 64, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture
def bad_inputs(tmp_path):
    """A JSONL table mixing good rows with every bad-input case of the issue."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        _save(_photo(i), d / f"good{i}.jpg", "JPEG")
    full = _save(_photo(9, 200, 150), d / "tmp.jpg", "JPEG")
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "empty.jpg").write_bytes(b"")
    _save(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), d / "alpha.png", "PNG")
    _save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), d / "cmyk.jpg", "JPEG")
    gray16 = Image.fromarray(np.full((30, 40), 50000, dtype=np.uint16))
    _save(gray16, d / "gray16.png", "PNG")
    _save(Image.new("1", (20000, 20000)), d / "bomb.png", "PNG")  # 400 Mpx, ~50 kB on disk

    def row(id_, image, caption):
        return {"id": id_, "image_path": f"imgs/{image}", "caption": caption}

    rows = [
        row("good0", "good0.jpg", "A dog runs on the beach."),
        row("truncated", "truncated.jpg", "ok caption"),
        row("zero-byte", "empty.jpg", "ok caption"),
        row("missing", "does-not-exist.jpg", "ok caption"),
        row("alpha", "alpha.png", "A red sign."),
        row("cmyk", "cmyk.jpg", "A printed poster."),
        row("gray16", "gray16.png", "An x-ray scan."),
        row("bomb", "bomb.png", "ok caption"),
        row("empty-caption", "good1.jpg", ""),
        row("space-caption", "good1.jpg", "  \t\n "),
        row("long-caption", "good2.jpg", "word " * 20_001),  # over 100,000 characters
        row("dup", "good3.jpg", "The first one wins."),
        row("dup", "good1.jpg", "The second one is rejected."),
        row("good1", "good1.jpg", "  A cat sleeps on a sofa.  "),
    ]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(1, b'{"id": "non-utf8", "image_path": "imgs/good0.jpg", "caption": "caf\xe9"}')
    table = tmp_path / "pairs.jsonl"
    table.write_bytes(b"\n".join(lines) + b"\n")
    return table


EXPECTED_REJECTS = {
    "truncated": images.TRUNCATED,
    "zero-byte": images.EMPTY,
    "missing": images.MISSING,
    "bomb": images.TOO_MANY_PIXELS,
    "empty-caption": prep.CAPTION_EMPTY,
    "space-caption": prep.CAPTION_EMPTY,
    "long-caption": prep.CAPTION_TOO_LONG,
    "non-utf8": prep.CAPTION_NOT_UTF8,
    "dup": prep.DUPLICATE_ID,
}


def _rejected(out):
    return [json.loads(line) for line in (out / prep.REJECTED_FILE).read_text().splitlines()]


def test_every_bad_input_rejected_with_reason_and_good_ones_kept(bad_inputs, tmp_path):
    out = tmp_path / "prepared"
    result = prep.prepare(read_table(bad_inputs), out, negatives=False, progress=False)
    rejected = _rejected(out)
    assert {r["id"]: r["reason"] for r in rejected} == EXPECTED_REJECTS
    assert all(set(r) == {"id", "source", "stage", "reason", "detail"} for r in rejected)
    assert all(r["source"] == "table" for r in rejected)
    stages = {r["id"]: r["stage"] for r in rejected}
    assert stages["dup"] == "dedup" and stages["bomb"] == "image"
    assert stages["non-utf8"] == "caption"
    reader_order = [r.id for r in read_table(bad_inputs)]
    rejected_ids = [r["id"] for r in rejected]
    dup_position = len(reader_order) - 1 - reader_order[::-1].index("dup")  # the second "dup"
    positions = [dup_position if i == "dup" else reader_order.index(i) for i in rejected_ids]
    assert positions == sorted(positions), "rejected.jsonl is in reader order"

    table = pq.read_table(out / prep.PAIRS_FILE).to_pylist()
    kept = {r["id"]: r for r in table}
    assert list(kept) == ["good0", "alpha", "cmyk", "gray16", "dup", "good1"]
    assert kept["dup"]["caption"] == "The first one wins."
    assert kept["good1"]["caption"] == "A cat sleeps on a sofa."  # stripped
    assert (kept["alpha"]["width"], kept["alpha"]["height"]) == (40, 30)
    assert all(r["itm"] == 1 and r["source"] == "table" for r in table)
    counts = result.counts()
    assert counts["n_input"] == 15 and counts["n_rejected"] == 9
    assert counts["rejected_by_reason"][prep.CAPTION_EMPTY] == 2
    summary = json.loads((out / prep.SUMMARY_FILE).read_text())
    assert summary["rejected_by_reason"] == counts["rejected_by_reason"]


def test_schema_matches_the_contract(bad_inputs, tmp_path):
    prep.prepare(read_table(bad_inputs), tmp_path / "p", negatives=False, progress=False)
    schema = pq.read_schema(tmp_path / "p" / prep.PAIRS_FILE)
    assert [(f.name, str(f.type)) for f in schema] == [
        ("id", "string"),
        ("source", "string"),
        ("image_path", "string"),
        ("caption", "string"),
        ("itm", "int8"),
        ("width", "int32"),
        ("height", "int32"),
    ]


def test_limits_are_parameters(bad_inputs, tmp_path):
    small = tmp_path / "small"
    prep.prepare(read_table(bad_inputs), small, max_pixels=1500, negatives=False, progress=False)
    reasons = {r["id"]: r["reason"] for r in _rejected(small)}
    assert reasons["good0"] == reasons["good1"] == images.TOO_MANY_PIXELS  # 64x48 > 1500
    assert "alpha" not in reasons  # 40x30 = 1200 pixels
    short = tmp_path / "short"
    prep.prepare(
        read_table(bad_inputs), short, max_caption_chars=23, negatives=False, progress=False
    )
    captions = {r["id"]: r["caption"] for r in pq.read_table(short / prep.PAIRS_FILE).to_pylist()}
    assert captions["good0"] == "A dog runs on the beach"  # 24 characters: cut, not rejected
    assert captions["good1"] == "A cat sleeps on a sofa."  # 23 once stripped: at the limit
    summary = json.loads((short / prep.SUMMARY_FILE).read_text())
    assert summary["n_captions_truncated"] == 1  # good0 only


def test_csv_non_utf8_row_rejected_rest_kept(tmp_path):
    _save(_photo(), tmp_path / "a.jpg", "JPEG")
    (tmp_path / "t.csv").write_bytes(
        b"id,image_path,caption\nr1,a.jpg,fine caption\nr2,a.jpg,caf\xe9 au lait\n"
        b'r3,a.jpg,"quoted, with comma"\n'
    )
    out = tmp_path / "p"
    prep.prepare(read_table(tmp_path / "t.csv"), out, negatives=False, progress=False)
    assert [r["reason"] for r in _rejected(out)] == [prep.CAPTION_NOT_UTF8]
    captions = pq.read_table(out / prep.PAIRS_FILE).column("caption").to_pylist()
    assert captions == ["fine caption", "quoted, with comma"]


def test_outputs_are_byte_identical_across_runs(bad_inputs, tmp_path):
    for name, workers in (("a", 1), ("b", 2)):  # worker processes change nothing
        prep.prepare(
            read_table(bad_inputs), tmp_path / name, seed=3, workers=workers, progress=False
        )
    for f in (prep.PAIRS_FILE, prep.REJECTED_FILE, prep.SUMMARY_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def _pairs(n):
    return [prep.Pair(f"p{i}", "table", f"img{i}.jpg", f"caption {i}", 1, 10, 10) for i in range(n)]


def test_negatives_are_a_seeded_derangement():
    pairs = _pairs(20)
    neg = prep.make_negatives(pairs, seed=7)
    assert len(neg) == 20 and all(n.itm == 0 for n in neg)
    own = {p.image_path: p.caption for p in pairs}
    assert all(own[n.image_path] != n.caption for n in neg)
    assert sorted(n.caption for n in neg) == sorted(p.caption for p in pairs)  # a permutation
    assert prep.make_negatives(pairs, seed=7) == neg
    assert prep.make_negatives(pairs, seed=8) != neg
    assert len(prep.make_negatives(pairs, seed=7, ratio=0.5)) == 10
    assert len({n.id for n in neg} | {p.id for p in pairs}) == 40


def test_negatives_only_for_sources_without_mismatched_pairs():
    pairs = _pairs(5) + [prep.Pair("x", "table", "imgx.jpg", "other", 0, 10, 10)]
    assert prep.make_negatives(pairs, seed=0) == []
    assert prep.make_negatives(_pairs(1), seed=0) == []


def test_bundled_sample_prepares_cleanly(tmp_path):
    result = prep.prepare(read_sample(), tmp_path / "p", progress=False)
    counts = result.counts()
    assert counts["n_rejected"] == 0 and counts["n_negatives_generated"] == 0
    assert counts["by_source"] == {"sample": {"matched": 17, "mismatched": 10}}


def test_cli_prepare_prints_summary_with_rejections(bad_inputs, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app,
        [
            "prepare",
            "--source",
            "table",
            "--input",
            str(bad_inputs),
            "--out",
            str(out),
            "--negatives",
            "true",
            "--seed",
            "1",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "rejected by reason" in res.output and prep.DUPLICATE_ID in res.output
    table = pq.read_table(out / prep.PAIRS_FILE).to_pylist()
    assert sum(r["itm"] == 0 for r in table) == 6  # one negative per kept pair
    bad = CliRunner().invoke(app, ["prepare", "--negatives", "maybe", "--out", str(out)])
    assert bad.exit_code != 0


# Resume: finished chunks are saved beside the outputs, a killed run picks up after them.

OUTPUTS = (prep.PAIRS_FILE, prep.REJECTED_FILE, prep.SUMMARY_FILE)
KILLED_RUN = """
import sys
from pipeline import prepare as prep
from pipeline.readers.tabular import read_table
prep.prepare(read_table(sys.argv[1]), sys.argv[2], chunk_size=3, inputs={"test": "kill"},
             seed=2, progress=False)
"""


def _same_outputs(a, b):
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in OUTPUTS)


def test_killed_run_resumes_without_decoding_finished_chunks(bad_inputs, tmp_path):
    """A real SIGKILL of a subprocess after two finished chunks, then a resumed run: the same
    bytes as an uninterrupted run, and the finished chunks' images are not read again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    late_dup = {"id": "good0", "image_path": "imgs/good2.jpg", "caption": "A late duplicate."}
    lines = bad_inputs.read_bytes().splitlines(keepends=True) + [
        json.dumps(late_dup).encode() + b"\n"
    ]  # 16 records: chunks of 3 -> 6 chunks; the last one repeats an id from chunk 0
    table = tmp_path / "full.jsonl"  # the same folder as the fifo: same image paths
    table.write_bytes(b"".join(lines))
    kw = dict(chunk_size=3, inputs={"test": "kill"}, seed=2, progress=False)
    whole = prep.prepare(read_table(table), tmp_path / "whole", **kw)
    assert whole.chunks == 6 and whole.chunks_resumed == 0
    assert not (tmp_path / ".whole.work").exists()  # removed after the final write

    # The killed run reads its table from a fifo that the test fills only up to chunk 2, so it
    # is blocked (not racing) when it is killed.
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    out, work = tmp_path / "out", tmp_path / ".out.work"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(fifo), str(out)])
    try:
        with open(fifo, "wb") as writer:
            writer.writelines(lines[:7])  # chunks 0 and 1, and one record of chunk 2
            writer.flush()
            deadline = time.monotonic() + 60
            while not (work / "part-000001.done.json").exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in work.glob("*.done.json")) == [
        "part-000000.done.json",
        "part-000001.done.json",
    ]
    assert not out.exists() or not any(out.iterdir())

    # good0.jpg is only decoded in chunk 0: gone now, yet the resumed run keeps good0 as before.
    (tmp_path / "imgs" / "good0.jpg").unlink()
    resumed = prep.prepare(read_table(table), out, **kw)
    assert (resumed.chunks, resumed.chunks_resumed) == (6, 2)
    assert _same_outputs(out, tmp_path / "whole")
    assert not work.exists() and sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    rejected = {r["id"]: r["reason"] for r in _rejected(out)}
    assert rejected["good0"] == prep.DUPLICATE_ID  # the late repeat of a skipped chunk's id


def test_chunk_size_does_not_change_the_outputs(bad_inputs, tmp_path):
    """Chunks of 1, 4 and the default give the same bytes, also past the 256-record blocks that
    order rejected.jsonl (600 records: the 15 rows again and again, ids repeating after 285)."""
    rows = bad_inputs.read_bytes().splitlines()
    big = tmp_path / "big.jsonl"
    big.write_bytes(
        b"\n".join(
            rows[i % len(rows)].replace(b'"id": "', f'"id": "r{i % 285}-'.encode(), 1)
            for i in range(600)
        )
        + b"\n"
    )
    for table, sizes in ((bad_inputs, (1, 4)), (big, (1, 100, 300))):
        ref = tmp_path / f"{table.stem}-default"
        prep.prepare(read_table(table), ref, seed=1, progress=False)
        for size in sizes:
            out = tmp_path / f"{table.stem}-{size}"
            result = prep.prepare(read_table(table), out, seed=1, chunk_size=size, progress=False)
            assert result.chunks == -(-result.n_input // size)
            assert _same_outputs(out, ref), (table.name, size)
    reasons = [r["reason"] for r in _rejected(ref)]
    assert reasons.count(prep.DUPLICATE_ID) == 600 - 285  # across chunks and blocks
    with pytest.raises(InputError, match="chunk_size"):
        prep.prepare(read_table(bad_inputs), tmp_path / "x", chunk_size=0, progress=False)


def _crash_after(records, n):
    """The reader dies (an exception, as from a lost disk) after n records."""
    for i, rec in enumerate(records):
        if i == n:
            raise OSError("input went away")
        yield rec


def test_cli_resumes_and_discards_work_of_other_parameters(bad_inputs, tmp_path):
    from pipeline.prepare_work import describe_inputs
    from pipeline.readers.tabular import Columns

    out, work = tmp_path / "cli", tmp_path / ".cli.work"
    inputs = describe_inputs("table", str(bad_inputs), None, None, Columns())  # as the CLI does

    def crash(**kw):
        with pytest.raises(OSError, match="went away"):
            prep.prepare(_crash_after(read_table(bad_inputs), 7), out, progress=False, **kw)
        assert len(list(work.glob("*.done.json"))) == 2  # chunks 0-2 and 3-5 were finished

    def cli(*extra):
        args = ["prepare", "--source", "table", "--input", str(bad_inputs), "--out", str(out)]
        res = CliRunner().invoke(app, [*args, "--chunk-size", "3", "--no-progress", *extra])
        assert res.exit_code == 0, res.output
        assert not work.exists()
        return res.output

    crash(chunk_size=3, inputs=inputs)
    assert "5 chunks, 2 resumed" in cli()
    first = {f: (out / f).read_bytes() for f in OUTPUTS}
    crash(chunk_size=3, inputs=inputs, max_caption_chars=2000)
    output = cli("--max-caption-chars", "23")  # other parameters: the saved chunks are stale
    assert "discarded" in output and "5 chunks, 0 resumed" in output
    kept = {r["id"]: r["caption"] for r in pq.read_table(out / prep.PAIRS_FILE).to_pylist()}
    assert kept["good0"] == "A dog runs on the beach"  # cut to 23 characters, not rejected
    cli()
    assert {f: (out / f).read_bytes() for f in OUTPUTS} == first


def test_interleave_spreads_mismatched_pairs_evenly():
    pairs = _pairs(40)
    neg = prep.make_negatives(pairs, seed=3, ratio=0.5)
    mixed = prep.interleave_by_itm(pairs + neg)
    assert sorted(p.id for p in mixed) == sorted(p.id for p in pairs + neg)
    assert [p for p in mixed if p.itm == 1] == pairs  # each kind keeps its order
    assert [p for p in mixed if p.itm == 0] == neg
    rate = len(neg) / len(mixed)
    for n in (1, 3, 8, 16):  # any contiguous shard of n pairs: n * rate mismatched, within one
        for start in range(0, len(mixed), n):
            shard = mixed[start : start + n]
            assert abs(sum(p.itm == 0 for p in shard) - len(shard) * rate) <= 1, (n, start)


def test_prepared_shards_hold_both_itm_classes(tmp_path):
    import pyarrow.parquet as pq

    prep.prepare(read_sample(), tmp_path / "p", progress=False)
    itm = pq.read_table(tmp_path / "p" / prep.PAIRS_FILE).column("itm").to_pylist()
    assert (len(itm), itm.count(0)) == (27, 10)
    shards = [itm[i : i + 8] for i in range(0, len(itm), 8)]  # label.samples_per_shard: 8
    assert all(0 in s and 1 in s for s in shards), shards
