"""Expected failures of every `pipeline` command: one or two lines saying what is wrong and what
to do, exit code 2, no traceback, nothing left behind; `--debug` and real bugs keep tracebacks."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from labeling_inputs import write_label_stage_inputs, write_labeling_inputs
from typer.testing import CliRunner

from pipeline.cli import COMMAND_ORDER, app
from pipeline.pairs import write_pairs_parquet
from pmu.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    """Exit 2, an `error:` line (plus at most a hint line), each fragment in it, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and 1 <= len(lines) <= 2, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# ----------------------------------------------------------------------------- prepare


def test_prepare_with_a_missing_input_leaves_nothing(tmp_path):
    out = tmp_path / "data" / "prepared"
    result = run("prepare", "--source", "table", "--input", "/nonexistent.csv", "--out", out)
    assert_user_error(result, "'/nonexistent.csv' does not exist", "--input")
    assert not (tmp_path / "data").exists()  # no work folder, no output folder


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--source", "nope"], ["--source 'nope' is not one of", "hf"]),
        (["--source", "table"], ["--input is required for source 'table'"]),
        (["--source", "newsclippings", "--input", "{ann}"], ["--visualnews-data"]),
        (["--source", "table", "--input", "{xlsx}"], ["unknown table format '.xlsx'"]),
        (["--source", "table", "--input", "{empty}"], ["is empty"]),
        (["--source", "wds", "--input", "{dir}"], ["no *.tar files"]),
        (["--source", "sample", "--input", "{dir}"], ["captions.jsonl"]),
        (
            ["--source", "table", "--input", "{csv}", "--image-root", "/no/such/dir"],
            ["--image-root"],
        ),
        (
            ["--source", "newsclippings", "--input", "{bad_json}", "--visualnews-data", "{ann}"],
            ["is not valid JSON"],
        ),  # fmt: skip
        (["--source", "table", "--input", "{header_only}"], ["holds no records"]),
        (["--negatives", "maybe"], ["--negatives expects true or false"]),
    ],
)
def test_prepare_input_errors(tmp_path, args, fragments):
    files = {
        "ann": tmp_path / "ann.json",
        "xlsx": tmp_path / "t.xlsx",
        "empty": tmp_path / "empty.csv",
        "dir": tmp_path / "folder",
        "csv": tmp_path / "t.csv",
        "bad_json": tmp_path / "bad.json",
        "header_only": tmp_path / "header.csv",
    }
    files["ann"].write_text('{"annotations": []}')
    files["xlsx"].write_text("x")
    files["empty"].write_bytes(b"")
    files["dir"].mkdir()
    files["csv"].write_text("image_path,caption\na.jpg,x\n")
    files["bad_json"].write_text("{not json")
    files["header_only"].write_text("image_path,caption\n")
    args = [a.format(**files) for a in args]
    out = tmp_path / "out" / "prepared"
    result = run("prepare", *args, "--out", out, "--no-progress")
    if "--negatives" in args:  # a Click usage error: also exit 2, with the usage line
        assert result.exit_code == 2 and fragments[0] in result.output
        return
    assert_user_error(result, *fragments)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- later stages


def _empty_pairs(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pairs_parquet([], path)
    return path


@pytest.mark.parametrize("command", ["mine-nouns", "detect-objects", "label-objects"])
def test_stages_need_pairs(tmp_path, command):
    missing = tmp_path / "nope" / "pairs.parquet"
    assert_user_error(
        run(command, "--pairs", missing), f"'{missing}' does not exist", "pipeline prepare"
    )
    empty = _empty_pairs(tmp_path / "prepared" / "pairs.parquet")
    assert_user_error(run(command, "--pairs", empty), "holds no pairs", "rejected.jsonl")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    assert_user_error(run(command, "--pairs", junk), "not a readable parquet file")


@pytest.fixture
def labeling_inputs(tmp_path):
    """Pairs, vocabularies, crafted boxes and tiny-CLIP prompts for 4 pairs."""
    return write_label_stage_inputs(tmp_path, n=4)


def _label_args(paths, out):
    names = ("pairs", "boxes", "prompts", "entities", "relations", "rejected")
    return [x for n in names for x in (f"--{n}", paths[n])] + ["--out", out, "--num-workers", 0]


def test_embed_prompts_on_an_empty_vocabulary(tmp_path):
    entities = tmp_path / "entities.json"
    entities.write_text(json.dumps({"source": "spacy", "n_captions": 3, "entities": []}))
    relations = tmp_path / "relations.json"
    relations.write_text(json.dumps({"relations": [{"pid": "P1", "label": "x"}]}))
    args = ["--entities", entities, "--relations", relations, "--out", tmp_path / "p.st"]
    assert_user_error(
        run("embed-prompts", *args), "empty vocabulary", "no nouns in 3 captions", "mine-nouns"
    )
    relations.unlink()
    entities.write_text(json.dumps({"entities": [{"name": "dog", "count": 1}]}))
    assert_user_error(run("embed-prompts", *args), "does not exist", "fetch-relations")
    assert not (tmp_path / "p.st").exists()


def test_embed_prompts_template_without_placeholder(labeling_inputs, tmp_path):
    p = labeling_inputs
    args = ["--entities", p["entities"], "--relations", p["relations"], "--out", tmp_path / "x"]
    result = run("embed-prompts", *args, "--entity-template", "A photo.")
    assert_user_error(result, "has no {entity} placeholder")


def test_label_objects_with_stale_prompts(labeling_inputs, tmp_path):
    p = labeling_inputs
    doc = json.loads(p["entities"].read_text())
    doc["entities"].append({"name": "zebra", "count": 1})
    p["entities"].write_text(json.dumps(doc))
    out = tmp_path / "shards"
    result = run("label-objects", *_label_args(p, out))
    assert_user_error(
        result, "stale prompts", "entities changed", "re-run `pipeline embed-prompts`"
    )
    assert not out.exists()


def test_label_objects_with_boxes_of_other_pairs(labeling_inputs, tmp_path):
    p = labeling_inputs
    table = pq.read_table(p["boxes"])
    pq.write_table(table.slice(0, 2).replace_schema_metadata(table.schema.metadata), p["boxes"])
    result = run("label-objects", *_label_args(p, tmp_path / "shards"))
    assert_user_error(result, "lacks 2 of the 4 prepared pairs", "detect-objects")


def test_label_objects_records_file_hashes_that_verify_checks(labeling_inputs, tmp_path):
    from pipeline.verify import verify_shards
    from pmu.io import file_sha256

    out = tmp_path / "shards"
    result = run("label-objects", *_label_args(labeling_inputs, out))
    assert result.exit_code == 0, result.output
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert set(files) == {
        "sizes.json",
        "members.sha256",
        *json.loads((out / "sizes.json").read_text()),
    }
    for name, entry in files.items():
        assert entry == {
            "sha256": file_sha256(out / name),
            "bytes": (out / name).stat().st_size,
        }
    assert verify_shards(out).ok and not verify_shards(out).notes


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--preset", "huge"], ["unknown preset 'huge'", "base, small, tiny"]),
        (["--device", "cuda:7"], ["--device cuda:7"]),
        (["--device", "gpu"], ["'gpu' is not a device"]),
        (["--clip", "/no/clip.safetensors"], ["CLIP checkpoint", "does not exist"]),
        (["--engine", "spark"], ["--engine 'spark' is not one of local, ray"]),
        (["--stage-params", "/no/params.yaml"], ["--stage-params file"]),
    ],
)
def test_label_objects_bad_parameters(labeling_inputs, tmp_path, args, fragments):
    result = run("label-objects", *_label_args(labeling_inputs, tmp_path / "s"), *args)
    if "--engine" in args:
        assert result.exit_code == 2 and fragments[0] in result.output
        return
    assert_user_error(result, *fragments)


def test_detect_objects_with_a_missing_detector_file(labeling_inputs, tmp_path):
    result = run("detect-objects", "--pairs", labeling_inputs["pairs"], "--detector", "/no/y.pt")
    assert_user_error(result, "detector weights '/no/y.pt' does not exist")


# ----------------------------------------------------------------------------- verify, inspect


def test_verify_and_inspect_without_shards(tmp_path):
    for command in ("verify", "inspect"):
        assert_user_error(run(command, tmp_path / "nope"), "does not exist", "label-objects")
        assert_user_error(run(command, tmp_path), "no shards in", "label-objects")


def test_verify_and_inspect_after_a_shard_was_deleted(synthetic_shards, tmp_path):
    (synthetic_shards / "shard-000001.tar").unlink()
    result = run("verify", synthetic_shards)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "shard-000001.tar: listed in sizes.json but missing" in result.output
    result = run("inspect", synthetic_shards, "--out", tmp_path / "r.html")
    assert result.exit_code == 0 and "warning: manifest counts 16 samples" in result.output
    (synthetic_shards / "shard-000000.tar").unlink()
    assert_user_error(run("inspect", synthetic_shards), "no shard-*.tar", "sizes.json lists 2")


def test_verify_and_inspect_in_a_subprocess_print_no_noise(synthetic_shards):
    """As a user runs them: exit codes, and nothing on stderr but the message (no dulwich,
    Rich or shutdown noise)."""
    (synthetic_shards / "shard-000001.tar").unlink()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    verify = subprocess.run(
        [sys.executable, "-m", "pipeline", "verify", str(synthetic_shards)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert verify.returncode == 1 and verify.stderr == "", verify.stderr
    assert "listed in sizes.json but missing" in verify.stdout
    (synthetic_shards / "shard-000000.tar").unlink()
    inspect = subprocess.run(
        [sys.executable, "-m", "pipeline", "inspect", str(synthetic_shards)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert inspect.returncode == 2 and inspect.stdout == ""
    assert (
        inspect.stderr.startswith("error: no shard-*.tar") and len(inspect.stderr.splitlines()) == 2
    )


# ----------------------------------------------------------------------------- --debug, bugs


def test_debug_shows_the_traceback_of_an_expected_error(tmp_path):
    result = run("--debug", "prepare", "--source", "table", "--input", "/nonexistent.csv")
    assert isinstance(result.exception, InputError) and result.exit_code == 1
    assert "does not exist" in str(result.exception)


def test_a_real_bug_keeps_its_traceback(synthetic_shards, monkeypatch):
    import pipeline.verify

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(pipeline.verify, "verify_shards", broken)
    result = run("verify", synthetic_shards)
    assert isinstance(result.exception, KeyError) and result.exit_code == 1


def test_missing_input_in_a_subprocess_is_two_lines_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "prepare", "--source", "table", "--input", "/none.csv"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: --input '/none.csv' does not exist",
        "  pass a .parquet, .csv or .jsonl table with --input",
    ]
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- help, imports


def test_help_lists_commands_in_pipeline_order_and_is_fast():
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="80")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and seconds < 5, seconds  # ~0.2 s on the 2-core machine
    listed = [
        line.split()[0]
        for line in proc.stdout.split("Commands:")[1].splitlines()
        if line.startswith("  ") and not line.startswith("   ")
    ]
    expected = [c for c in COMMAND_ORDER if c in listed]
    assert listed[: len(expected)] == expected and listed[0] in ("synth-world", "prepare")
    assert "..." not in proc.stdout.split("Commands:")[1]  # first sentences in full
    label_help = subprocess.run(
        [sys.executable, "-m", "pipeline", "label-objects", "--help"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert "[default: data/prepared/rejected.jsonl]" in " ".join(label_help.split())


def test_package_imports_stay_light():
    code = (
        "import sys, pipeline, pmu.shards, trainer; "
        "print(sorted(m for m in ('typer', 'click', 'torch', 'pipeline.cli') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=True,
    )
    assert proc.stdout.strip() == "[]"
    typer_cli = Path(sys.executable).parent / "typer"
    proc = subprocess.run(
        [str(typer_cli), "pipeline", "run", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )
    assert proc.returncode == 0 and "label-objects" in proc.stdout  # README: typer pipeline run


def test_mine_nouns_with_a_missing_spacy_model(tmp_path):
    paths = write_labeling_inputs(tmp_path, n=2)
    args = ["--pairs", paths["pairs"], "--out", tmp_path / "e.json", "--spacy-model", "no_model_x"]
    assert_user_error(run("mine-nouns", *args), "cannot load spaCy model 'no_model_x'")


def test_boxes_in_another_order_are_accepted(labeling_inputs, tmp_path):
    from pipeline.checks import boxes_cover_pairs

    p = labeling_inputs
    table = pq.read_table(p["boxes"])
    reordered = tmp_path / "reordered.parquet"
    pq.write_table(table.take([3, 2, 1, 0]), reordered)
    boxes_cover_pairs(reordered, p["pairs"])  # every pair has a row: no error
    with pytest.raises(InputError, match="lacks 1 of the 4 prepared pairs"):
        pq.write_table(table.take([3, 2, 1]), reordered)
        boxes_cover_pairs(reordered, p["pairs"])
