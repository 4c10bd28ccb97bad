"""DVC wiring: the labeling chain reproduces on the sample, re-runs are no-ops, params invalidate
exactly their stage and what is downstream of it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.verify import verify_shards

REPO = Path(__file__).resolve().parents[1]
LABELING = {
    "prepare",
    "mine-nouns",
    "fetch-relations",
    "detect-objects",
    "embed-prompts",
    "label-objects",
    "verify",
}
TARGET = "verify"  # the end of the labeling chain (training stages are not run here)

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A temp git+DVC copy of the repo's pipeline, reproduced once up to `verify`."""
    root = tmp_path_factory.mktemp("dvc") / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("pmu", "pipeline"):
        shutil.copytree(REPO / package, root / package, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    venv_bin = str(Path(sys.executable).parent)
    env = dict(
        os.environ,
        PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
        PYTHONPATH=str(root),
        DVC_NO_ANALYTICS="1",
        PMU_REPRODUCIBLE="1",  # as `make repro` runs it
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    dvc = [os.path.join(venv_bin, "dvc")]
    _run(["git", "init", "-q"], root, env)
    _run(dvc + ["init", "-q"], root, env)
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")  # analytics off, list=append
    _run(dvc + ["repro", TARGET], root, env)
    return root, env, dvc


def _stages_that_would_run(project) -> set[str]:
    root, env, dvc = project
    out = _run(dvc + ["repro", "--dry", "--force-downstream", TARGET], root, env)
    return set(re.findall(r"Running stage '([^']+)'", out))


def _with_param(project, group: str, key: str, value):
    """Set params.yaml[group][key] and return what would re-run; params.yaml is restored."""
    path = project[0] / "params.yaml"
    original = path.read_text(encoding="utf-8")
    params = yaml.safe_load(original)
    params[group][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    try:
        return _stages_that_would_run(project)
    finally:
        path.write_text(original, encoding="utf-8")


def test_repro_builds_verified_shards_and_a_second_repro_is_a_no_op(project):
    root, env, dvc = project
    report = verify_shards(root / "shards")
    assert report.ok, report.render()
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["preset"] == "tiny" and manifest["counts"]["samples"] == report.samples > 0
    assert manifest["counts"]["objects"] > 0
    assert (root / "runs" / "dvc" / "label_stats.json").is_file()  # timings: untracked
    headline = json.loads((root / "metrics" / "labels.json").read_text())
    assert headline["samples"] == report.samples and "seconds_total" not in headline

    again = _run(dvc + ["repro", TARGET], root, env)
    assert "Running stage" not in again
    status = json.loads(_run(dvc + ["status", "--json"], root, env) or "{}")
    assert not LABELING & set(status)
    assert _stages_that_would_run(project) == set()


@pytest.mark.parametrize(
    "group, key, value, expected",
    [
        ("label", "tau", 0.5, {"label-objects", "verify"}),
        ("label", "k_ent", 3, {"label-objects", "verify"}),
        ("label", "crop_padding", 0.1, {"label-objects", "verify"}),
        ("detect", "top_k", 2, {"detect-objects", "label-objects", "verify"}),
        ("mine_nouns", "m", 20, {"mine-nouns", "embed-prompts", "label-objects", "verify"}),
    ],
)
def test_a_parameter_invalidates_its_stage_and_what_is_downstream(
    project, group, key, value, expected
):
    assert _with_param(project, group, key, value) & LABELING == expected


def test_prompt_templates_invalidate_embed_prompts_and_labels(project):
    path = project[0] / "params.yaml"
    original = path.read_text(encoding="utf-8")
    params = yaml.safe_load(original)
    params["embed_prompts"]["relation_templates"] = "A+B"  # ensemble the paper's A and B
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    try:
        stale = _stages_that_would_run(project) & LABELING
    finally:
        path.write_text(original, encoding="utf-8")
    assert stale == {"embed-prompts", "label-objects", "verify"}


def test_another_cpu_rebuilds_the_same_dvc_lock(project):
    """Reproducible mode pins what can be emulated on this CPU: torch's AVX2 kernels, MKL's and
    oneDNN's AVX2 paths and one core re-run the whole labeling chain (as `make repro` runs it)
    to the same dvc.lock (another CPU model can still differ: docs/reproducibility.md)."""
    root, env, dvc = project
    before = (root / "dvc.lock").read_text()
    other = dict(env, ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    other.update(ONEDNN_MAX_CPU_ISA="AVX2")
    one_core = sorted(os.sched_getaffinity(0))[:1]
    proc = subprocess.run(
        dvc + ["repro", "--force", TARGET],
        cwd=root,
        env=other,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.sched_setaffinity(0, one_core),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Running stage 'detect-objects'" in proc.stdout  # really re-ran
    assert (root / "dvc.lock").read_text() == before
