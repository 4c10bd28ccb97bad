"""The Ray Data engine writes the local engine's bytes; the local engine never imports Ray."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.label import PROGRESS_DIR, label_objects
from pipeline.settings import LabelParams, LabelSettings
from pipeline.verify import verify_shards

REPO = Path(__file__).resolve().parents[1]
DETECT = dict(batch_size=8, imgsz=320, conf=0.0, top_k=4, num_workers=0)  # as in params.yaml
LABEL = dict(samples_per_shard=8, image_batch_size=8, crop_batch_size=16, num_workers=2)

# Runs the local engine (both stages) in a fresh interpreter and lists the Ray modules it loaded.
LOCAL = """
import json, sys
from pathlib import Path
from typer.testing import CliRunner
from pipeline.cli import app
from pipeline.detect import detect_objects
from pipeline.label import label_objects
from pipeline.settings import DetectParams, DetectSettings, LabelParams, LabelSettings

p = json.loads(sys.argv[1])
detect = DetectSettings(pairs=p["pairs"], out=p["boxes"], params=DetectParams(**DETECT))
detect_objects(detect, progress=False, threads=1)
labels = LabelSettings(
    pairs=p["pairs"], boxes=p["boxes"], prompts=p["prompts"], entities=p["entities"],
    relations=p["relations"], out=p["shards"], rejected=p["rejected"], params=LabelParams(**LABEL),
)
label_objects(labels, progress=False, threads=1)
assert CliRunner().invoke(app, ["--help"]).exit_code == 0
print(json.dumps(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))))
"""


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The bundled sample prepared, vocabularies mined/fetched, prompts embedded (tiny preset)."""
    from contextlib import redirect_stderr
    from io import StringIO

    from pipeline.nouns import mine_nouns
    from pipeline.prepare import prepare
    from pipeline.prompts import embed_prompts
    from pipeline.readers.sample import read_sample
    from pipeline.relations import fetch_relations

    root = tmp_path_factory.mktemp("ray-sample")
    prepare(read_sample(), root / "prepared", negatives=False, progress=False)
    paths = {
        "pairs": root / "prepared" / "pairs.parquet",
        "rejected": root / "prepared" / "rejected.jsonl",
        "entities": root / "vocab" / "entities.json",
        "relations": root / "vocab" / "relations.json",
        "prompts": root / "vocab" / "prompts.safetensors",
    }
    mine_nouns(paths["pairs"], paths["entities"], m=200, progress=False)
    with redirect_stderr(StringIO()):  # the offline-snapshot warning
        fetch_relations(paths["relations"], l=50)
    embed_prompts(paths["entities"], paths["relations"], paths["prompts"])
    return root, paths


@pytest.fixture(scope="module")
def local_run(sample):
    """boxes + shards from the local engine, made in a subprocess that must not import Ray."""
    root, paths = sample
    out = dict(paths, boxes=root / "local" / "boxes.parquet", shards=root / "local" / "shards")
    code = textwrap.dedent(LOCAL).replace("DETECT", repr(DETECT)).replace("LABEL", repr(LABEL))
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps({k: str(v) for k, v in out.items()})],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_local_engine_and_help_never_import_ray(local_run):
    _, ray_modules = local_run
    assert ray_modules == []


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray engine needs the `ray` extra")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_gives_the_local_bytes_and_resumes_local_markers(
    ray_cluster, sample, local_run, tmp_path
):
    from pipeline.cli import app

    root, paths = sample
    local, _ = local_run
    ray_opts = ["--engine", "ray", "--ray-cpus-per-actor", "1", "--ray-actors", "2"]

    boxes = tmp_path / "boxes.parquet"
    detect_args = ["detect-objects", "--pairs", str(paths["pairs"]), "--out", str(boxes)]
    for key, value in DETECT.items():
        detect_args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(app, detect_args + ray_opts)
    assert result.exit_code == 0, result.output
    assert boxes.read_bytes() == local["boxes"].read_bytes()

    # A local run killed after one shard, finished by the Ray engine: its markers are reused.
    shards = tmp_path / "shards"
    labels = LabelSettings(
        pairs=str(paths["pairs"]),
        boxes=str(boxes),
        prompts=str(paths["prompts"]),
        entities=str(paths["entities"]),
        relations=str(paths["relations"]),
        out=str(shards),
        rejected=str(paths["rejected"]),
        params=LabelParams(**LABEL),
    )
    partial = label_objects(labels, progress=False, stop_after_shards=1, threads=1)
    assert partial["shards_written"] == 1 and (shards / PROGRESS_DIR).is_dir()
    label_args = ["label-objects", "--pairs", str(paths["pairs"]), "--boxes", str(boxes)]
    for key in ("prompts", "entities", "relations"):
        label_args += [f"--{key}", str(paths[key])]
    label_args += ["--rejected", str(paths["rejected"]), "--out", str(shards)]
    for key, value in LABEL.items():
        label_args += [f"--{key.replace('_', '-')}", str(value)]
    label_args += ["--preset", "tiny", "--stats", str(tmp_path / "stats.json")]
    result = CliRunner().invoke(app, label_args + ray_opts)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["engine"] == "ray" and stats["actors"] == 2
    assert stats["shards_resumed"] == 1 and stats["counts"]["shards"] == 4

    assert _folder_bytes(shards) == _folder_bytes(local["shards"])
    assert sorted(_folder_bytes(shards)) == [
        "entities.json",
        "manifest.json",
        "members.sha256",
        "relations.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
        "shard-000003.tar",
        "sizes.json",
    ]
    assert verify_shards(shards).ok


def test_unknown_engine_is_refused(sample, tmp_path):
    from pipeline.cli import app

    _, paths = sample
    args = ["detect-objects", "--pairs", str(paths["pairs"]), "--out", str(tmp_path / "b.pq")]
    result = CliRunner().invoke(app, args + ["--engine", "spark"])
    assert result.exit_code != 0 and "not one of local, ray" in result.output
