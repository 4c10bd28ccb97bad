"""Reproducible mode: the same bytes whatever CPU kernels the machine would pick.

Other x86-64 CPUs are emulated on this one: ATEN_CPU_CAPABILITY (torch's AVX-512 / AVX2 /
portable kernels), MKL_ENABLE_INSTRUCTIONS (MKL's code path), ONEDNN_MAX_CPU_ISA (oneDNN's) and
the number of cores. Without the pins these change the bytes (the control below); with them
(`PMU_REPRODUCIBLE=1`) every float stage's output is byte-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from labeling_inputs import write_labeling_inputs

from pmu import runtime
from pmu.errors import InputError

PROBE = REPO_ROOT / "tests" / "repro_probe.py"
KERNEL_VARS = (
    "PMU_REPRODUCIBLE",
    "PMU_THREADS",
    *runtime.reproducible_env(),
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
)


def capabilities() -> set[str]:
    """ATen capabilities this CPU can run (the env var cannot raise torch above them)."""
    import torch

    best = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return set(order[: order.index(best) + 1]) if best in order else {"default"}


def probe(inputs: Path, workdir: Path, cores: int | None = None, **env: str) -> dict:
    """Run tests/repro_probe.py in a fresh process under `env` (and on `cores` cores). Its
    outputs go to `workdir/out`, named by the relative path `out` (configs and reports record
    paths: the same string in every run, as in a DVC project)."""
    workdir.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if k not in KERNEL_VARS}
    clean.update(env, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))
    allowed = sorted(os.sched_getaffinity(0))
    preexec = (lambda: os.sched_setaffinity(0, allowed[:cores])) if cores else None
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(inputs), "out"],
        cwd=workdir,
        env=clean,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=preexec,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[len("PROBE ") :])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_labeling_inputs(tmp_path_factory.mktemp("repro") / "in", n=8)["pairs"].parents[1]


@pytest.mark.slow
def test_without_the_pins_the_emulated_cpus_give_other_bytes(inputs, tmp_path):
    """The control: the emulation is real (else the test below could not fail)."""
    if "avx2" not in capabilities():
        pytest.skip("this CPU has no AVX2: nothing to emulate")
    plain = {"PMU_REPRODUCIBLE": "0", "PMU_THREADS": "1"}
    a = probe(inputs, tmp_path / "a", cores=1, ATEN_CPU_CAPABILITY="default", **plain)
    b = probe(inputs, tmp_path / "b", cores=1, ATEN_CPU_CAPABILITY="avx2", **plain)
    assert (a["aten"], b["aten"]) == ("DEFAULT", "AVX2") and a["onednn"]
    differ = {k for k in a["files"] if a["files"][k] != b["files"].get(k)}
    assert "prompts.safetensors" in differ and any(k.startswith("pretrain/") for k in differ)


@pytest.mark.slow
def test_reproducible_mode_gives_the_same_bytes_under_every_emulated_cpu(inputs, tmp_path):
    pinned = {"PMU_REPRODUCIBLE": "1", "PMU_THREADS": "1"}
    runs = {"default": probe(inputs, tmp_path / "default", ATEN_CPU_CAPABILITY="default", **pinned)}
    if "avx2" in capabilities():  # an AVX2 machine: MKL's AVX2 path, oneDNN's, one core
        runs["avx2"] = probe(
            inputs, tmp_path / "avx2", cores=1, ATEN_CPU_CAPABILITY="avx2",
            MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2", **pinned,
        )  # fmt: skip
    if "avx512" in capabilities():
        runs["avx512"] = probe(inputs, tmp_path / "avx512", ATEN_CPU_CAPABILITY="avx512", **pinned)
    ref = runs["default"]
    assert {"prompts.safetensors", "boxes.parquet", "shards/shard-000000.tar"} <= set(ref["files"])
    assert any(k.startswith("pretrain/") for k in ref["files"])
    assert any(k.startswith("mner/state/") for k in ref["files"])
    for name, got in runs.items():
        assert (got["aten"], got["onednn"], got["threads"]) == ("DEFAULT", False, 1), name
        differ = sorted(k for k in ref["files"].keys() | got["files"].keys()
                        if ref["files"].get(k) != got["files"].get(k))  # fmt: skip
        assert not differ, f"{name}: {differ}"


def clear_kernel_env(monkeypatch) -> None:
    """Unset the kernel variables; configure_process may write them: all restored afterwards."""
    for var in KERNEL_VARS:
        monkeypatch.setenv(var, "")  # recorded, so removed again after the test
        monkeypatch.delenv(var)


def test_mode_switch_and_settings(monkeypatch):
    clear_kernel_env(monkeypatch)
    assert not runtime.reproducible() and not runtime.configure_process()
    assert "MKL_CBWR" not in os.environ
    monkeypatch.setenv("PMU_REPRODUCIBLE", "0")
    assert not runtime.reproducible()
    monkeypatch.setenv("PMU_REPRODUCIBLE", "on")
    assert runtime.reproducible()
    monkeypatch.setenv("PMU_REPRODUCIBLE", "maybe")
    with pytest.raises(InputError, match="PMU_REPRODUCIBLE"):
        runtime.reproducible()
    monkeypatch.setenv("PMU_REPRODUCIBLE", "1")
    monkeypatch.setenv("PMU_THREADS", "3")
    assert runtime.configure_process()
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default" and os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert os.environ["OMP_NUM_THREADS"] == "3" == os.environ["OPENBLAS_NUM_THREADS"]
    monkeypatch.setenv("PMU_THREADS", "0")
    with pytest.raises(InputError, match="PMU_THREADS"):
        runtime.reproducible_threads()


def test_a_process_whose_torch_already_chose_its_kernels_is_refused(monkeypatch):
    """Set too late (torch has computed here already), the pins cannot act: say so, not proceed."""
    import torch

    torch.ones(2).sum()  # torch picks its kernels on first use
    if torch.backends.cpu.get_cpu_capability().lower() == "default":
        pytest.skip("this process already runs the portable kernels")
    clear_kernel_env(monkeypatch)
    monkeypatch.setenv("PMU_REPRODUCIBLE", "1")
    with pytest.raises(RuntimeError, match="PMU_REPRODUCIBLE=1 in the environment"):
        runtime.set_threads()
    assert torch.backends.mkldnn.enabled  # nothing half-applied


def test_timing_files_stay_out_of_what_dvc_hashes():
    """dvc.lock must not change from run to run: every timing file is untracked or ignored."""
    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    declared = {
        next(iter(e)) if isinstance(e, dict) else e
        for spec in stages.values()
        for kind in ("outs", "metrics", "plots")
        for e in spec.get(kind, [])
    }
    assert not {"metrics/label_stats.json", "metrics/pretrain_report.json"} & declared
    assert "--stats runs/dvc/" in stages["label-objects"]["cmd"]
    assert "--report runs/dvc/" in stages["pretrain"]["cmd"]
    ignored = (REPO_ROOT / ".dvcignore").read_text()
    assert "/checkpoints/finetune-*/stats.json" in ignored  # fine-tuning's wall time
    assert "/dvclive/pretrain/plots/metrics/train/samples_per_s.tsv" in ignored
