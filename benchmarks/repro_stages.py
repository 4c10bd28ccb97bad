"""Which DVC stage's outputs change under which CPU kernel setting (docs/reproducibility.md).

    python benchmarks/repro_stages.py                          # both modes, every setting
    python benchmarks/repro_stages.py --modes plain --settings aten-avx2,mkl-avx2 --json out.json

A copy of the project (tracked files, fresh git + DVC) is reproduced once per mode (`plain` =
the machine's kernels, `reproducible` = PMU_REPRODUCIBLE=1); then, for each setting, every
stage is re-run alone (`dvc repro -s -f`) from that reference's inputs under the setting and
its output files are compared with the reference's (files .dvcignore leaves out of DVC's hashes
are not compared). Settings emulate other CPUs on this one: ATEN_CPU_CAPABILITY (torch's
kernels), MKL_ENABLE_INSTRUCTIONS (MKL's code path), ONEDNN_MAX_CPU_ISA (oneDNN's), other
OpenBLAS / libjpeg-turbo paths, and thread counts. `noise` re-runs with nothing changed (what
differs from run to run). Everything runs on the first core this process may use, one torch
thread unless the setting says otherwise (run it alone on a quiet machine: ~2 min per setting).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pathspec
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# every stage of dvc.yaml with outputs, in pipeline order
STAGES = tuple(
    name
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))[
        "stages"
    ].items()
    if stage.get("outs") or stage.get("plots")
)
SETTINGS = {  # name -> (environment, cores)
    "noise": ({}, 1),
    "aten-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, 1),
    "mkl-avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1),
    "mkl-sse4_2": ({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, 1),
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, 1),
    "other-libs": ({"OPENBLAS_CORETYPE": "Sandybridge", "JSIMD_FORCENONE": "1"}, 1),
    "2-threads": ({"PMU_THREADS": "2"}, 2),
}
MODES = {"plain": {"PMU_REPRODUCIBLE": "0"}, "reproducible": {"PMU_REPRODUCIBLE": "1"}}
KERNEL_VARS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_",
    "ONEDNN_",
    "DNNL_",
    "OMP_",
    "OPENBLAS_",
    "PMU_",
    "JSIMD_",
)


def environment(project: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(KERNEL_VARS)}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(project),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        YOLO_OFFLINE="1",
        DVC_NO_ANALYTICS="1",
        TOKENIZERS_PARALLELISM="false",
        GIT_AUTHOR_NAME="b",
        GIT_AUTHOR_EMAIL="b@b",
        GIT_COMMITTER_NAME="b",
        GIT_COMMITTER_EMAIL="b@b",
        PMU_THREADS="1",
    )
    env.update(extra)
    return env


def run(args: list[str], project: Path, env: dict[str, str], cores: int = 1) -> float:
    allowed = sorted(os.sched_getaffinity(0))
    t = time.perf_counter()
    proc = subprocess.run(
        args,
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, allowed[:cores]),
    )
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def make_project(project: Path) -> None:
    """The tracked files of this checkout (as they are now), a fresh git repo and DVC."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (project / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, project / f)
    (project / "dvc.lock").unlink(missing_ok=True)
    env = environment(project, {})
    run(["git", "init", "-q"], project, env)
    shutil.rmtree(project / ".dvc", ignore_errors=True)
    run([str(BIN / "dvc"), "init", "-q"], project, env)
    shutil.copy2(ROOT / ".dvc" / "config", project / ".dvc" / "config")


def stage_outputs(project: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {name: [o["path"] for o in spec.get("outs", [])] for name, spec in stages.items()}


def file_hashes(project: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under `paths` that DVC hashes (not what .dvcignore leaves out)."""
    ignore = pathspec.GitIgnoreSpec.from_lines((project / ".dvcignore").read_text().splitlines())
    out = {}
    for p in paths:
        top = project / p
        for f in [top] if top.is_file() else sorted(x for x in top.rglob("*") if x.is_file()):
            rel = f.relative_to(project).as_posix()
            if not ignore.match_file(rel):
                out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def sweep(work: Path, mode: str, settings: list[str]) -> dict[str, dict[str, dict]]:
    project = work / mode
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    make_project(project)
    dvc = str(BIN / "dvc")
    wall = run([dvc, "repro"], project, environment(project, MODES[mode]))
    print(f"{mode}: full chain {wall:.1f} s", flush=True)
    ref_lock = work / f"{mode}.lock"
    shutil.copy2(project / "dvc.lock", ref_lock)
    outs = stage_outputs(project)
    ref = {stage: file_hashes(project, outs[stage]) for stage in STAGES}
    results: dict[str, dict[str, dict]] = {"full_chain_s": {"wall": round(wall, 1)}}
    for name in settings:
        extra, cores = SETTINGS[name]
        env = environment(project, {**MODES[mode], **extra})
        results[name] = {}
        for stage in STAGES:
            shutil.copy2(ref_lock, project / "dvc.lock")
            run([dvc, "checkout", "-f", "-q", "dvc.yaml"], project, environment(project, {}))
            t = run([dvc, "repro", "-s", "-f", stage], project, env, cores)
            got = file_hashes(project, outs[stage])
            differ = sorted(
                k for k in got.keys() | ref[stage].keys() if got.get(k) != ref[stage].get(k)
            )
            results[name][stage] = {"wall": round(t, 1), "differ": differ}
            print(
                f"{mode:<12} {name:<12} {stage:<15} {t:6.1f} s  "
                f"{'same' if not differ else ', '.join(differ[:3])}",
                flush=True,
            )
    shutil.copy2(ref_lock, project / "dvc.lock")
    return results


def table(results: dict[str, dict[str, dict[str, dict]]]) -> str:
    """Markdown: a row per stage, a column per mode/setting, `=` or the changed files' count."""
    cols = [(m, s) for m, r in results.items() for s in r if s != "full_chain_s"]
    lines = [
        "| stage | " + " | ".join(f"{m} {s}" for m, s in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for stage in STAGES:
        cells = []
        for m, s in cols:
            differ = results[m][s][stage]["differ"]
            cells.append("=" if not differ else f"{len(differ)} files")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="repro-stages-"))
    results = {m: sweep(work, m, args.settings.split(",")) for m in args.modes.split(",")}
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
