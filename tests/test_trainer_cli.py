"""The trainer scripts' command lines: params.yaml defaults, fast --help, one-line errors with
exit code 2, the DVC-output guard, and the DVC stages' flags."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pmu.errors import InputError
from pmu.settings import refuse_dvc_outputs
from trainer import finetune, run
from trainer.finetune_config import FinetuneConfig
from trainer.pretrain_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"run": REPO / "trainer" / "run.py", "finetune": REPO / "trainer" / "finetune.py"}


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-X", "importtime", str(SCRIPTS[name]), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def imported(stderr: str) -> set[str]:
    """Top-level packages in python -X importtime's report."""
    names = re.findall(r"^import time:.*\|\s+(\S+)$", stderr, flags=re.M)
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize(("name", "cls"), [("run", TrainConfig),
                                           ("finetune", FinetuneConfig)])  # fmt: skip
def test_help_lists_every_option_with_its_default_before_torch_loads(tmp_path, name, cls):
    start = time.perf_counter()
    proc = script(name, "--help", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not imported(proc.stderr) & {"torch", "transformers", "numpy"}
    assert elapsed < 10  # about a second on a quiet machine; generous for a busy CI box
    assert "settings: code defaults (no params.yaml here or above)" in " ".join(proc.stdout.split())
    # argparse starts each option's entry with "  -", continuation lines are indented further
    entries = re.split(r"\n(?=  -)", proc.stdout.split("options:", 1)[1])
    help_of = {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries if e.strip()}
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_of, flag
        assert "(default:" in help_of[flag] or f.name == "task", help_of[flag]


def write_project(root: Path, pretrain: dict, dvc_outs: list[str] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"pretrain": pretrain}))
    stage = {"cmd": "true", "outs": list(dvc_outs)}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    return root


def test_pretrain_defaults_come_from_the_projects_params_yaml(tmp_path, monkeypatch):
    project = write_project(tmp_path / "p", {"steps": 7, "batch_size": 3, "lr": 1})
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")  # found in a parent folder too
    cfg, args = run.parse_args(["--shards", "s", "--steps", "9"])
    assert (cfg.steps, cfg.batch_size, cfg.lr) == (9, 3, 1.0)  # flag > params > code
    assert args.params_file == project / "params.yaml"
    cfg, _ = run.parse_args(["--params", "none"])
    assert (cfg.steps, cfg.batch_size) == (1000, None)
    (project / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"stpes": 1}}))
    with pytest.raises(InputError, match=r"unknown `pretrain` parameters \['stpes'\]"):
        run.parse_args([])
    (project / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"steps": "many"}}))
    with pytest.raises(InputError, match="steps = 'many' is not a int"):
        run.parse_args([])


def test_in_the_repo_a_plain_run_gets_the_real_recipe(monkeypatch):
    """params.yaml's `pretrain:` / `finetune:` hold the code defaults (a real run's recipe);
    only the project's paths differ. The sample's tiny-model values are `demo:`'s."""
    monkeypatch.chdir(REPO)
    cfg, args = run.parse_args(["--shards", "shards"])
    assert cfg == TrainConfig(shards="shards") and args.params_changes == {}
    for task in ("mner", "mre"):
        cfg, _, args = finetune.parse_args(["--task", task])
        paths = yaml.safe_load((REPO / "params.yaml").read_text())["finetune"][task]
        paths = {k: v for k, v in paths.items() if k != "max_len"}
        expected = FinetuneConfig(task=task, init="checkpoints/pretrain", **paths)
        assert cfg == expected
        assert args.params_changes == {"init": "checkpoints/pretrain", **paths}


def test_the_first_line_says_which_params_yaml_values_are_in_use(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = finetune.main(["--task", "mner", "--init", "no/such/checkpoint"])
    first = capsys.readouterr().out.splitlines()[0]
    assert code == 2
    assert first.startswith(
        f"settings: values from {REPO / 'params.yaml'} (`finetune:` with `finetune: mner:` over "
        "it) in use, not the code defaults: init=checkpoints/pretrain, train=trainer/sample/"
    ), first
    assert first.endswith("flags override (--params none: code defaults only)"), first
    code = run.main(["--shards", "no/such/folder"])
    first = capsys.readouterr().out.splitlines()[0]
    assert code == 2
    assert first == (
        f"settings: read {REPO / 'params.yaml'} (`pretrain:`): it sets only code defaults; "
        "flags override"
    )


def dvc_stage_argv(stage: str) -> list[str]:
    """A dvc.yaml stage's command with params.yaml substituted, split into arguments."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]

    def value(match):
        node = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    return shlex.split(re.sub(r"\$\{([^}]+)\}", value, cmd))[2:]  # after `python SCRIPT`


def stage_paths(stage: str) -> set[str]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    entries = [e for kind in ("outs", "metrics", "plots") for e in spec.get(kind, [])]
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_dvc_stages_parse_and_write_only_their_declared_outputs(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DVC_STAGE", "pretrain")
    all_params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cfg, _ = run.parse_args(dvc_stage_argv("pretrain"))
    assert cfg.max_len == 80 and cfg.preset == "tiny"
    assert cfg.steps == all_params["demo"]["pretrain"]["steps"]  # the sample's short run
    assert {"pretrain", "demo.pretrain"} <= set(stages["pretrain"]["params"])
    tracked = stage_paths("pretrain")
    untracked = {"--out (resume states)", "--report"}  # the report's timings differ every run
    for flag, path in cfg.outputs().items():  # the dvclive folder holds the tracked plots
        inside = any(t.startswith(path + "/") for t in tracked)
        assert path in tracked or inside or flag in untracked, (flag, path)
    assert cfg.report.startswith("runs/"), cfg.report  # untracked by git as well
    refuse_dvc_outputs(cfg.outputs(), force=False)  # allowed: DVC runs the stage
    params = all_params["finetune"]
    for task in ("mner", "mre"):
        cfg, _, _ = finetune.parse_args(dvc_stage_argv(f"finetune-{task}"))
        assert cfg.train == params[task]["train"]
        assert cfg.epochs == all_params["demo"]["finetune"]["epochs"]
        paths = cfg.output_paths()
        tracked = stage_paths(f"finetune-{task}")
        assert {str(paths["out"]), str(paths["metrics"]), str(paths["plot"])} <= tracked
        # every finetune key the script reads is a declared param of the stage
        declared = set(stages[f"finetune-{task}"]["params"])
        read = {f"finetune.{k}" for k, v in params.items() if not isinstance(v, dict)}
        assert read | {f"finetune.{task}", "demo.finetune"} <= declared


# The settings the DVC stages ran before params.yaml's `pretrain:` / `finetune:` became the
# real recipe and the sample's values moved to `demo:` (params.yaml and dvc.yaml as of d34edc2):
# each stage must resolve exactly these, so `dvc repro` writes the same bytes.
BEFORE_DEMO_PARAMS = {
    "models": {"preset": "tiny", "detector": "", "clip": ""},
    "pretrain": {
        "steps": 50, "batch_size": 8, "lr": 1.0e-4, "weight_decay": 1.0e-3, "warmup_steps": 5,
        "grad_clip": 1.0, "lambda_itm": 1.0, "lambda_cit": 1.0, "lambda_coe": 1.0,
        "lambda_cir": 1.0, "hard_labels": False, "label_mass": "spread", "min_cover": 0.5,
        "align_pairs": "all", "proj_dim": 256, "max_len": 80, "num_workers": 2,
        "shuffle_buffer": 1000, "seed": 0, "ckpt_every": 25, "log_every": 5,
    },
    "finetune": {
        "init": "checkpoints/pretrain", "images": "", "epochs": 15, "batch_size": 8,
        "lr_encoder": 1.0e-3, "lr_head": 3.0e-3, "warmup": 0.1, "dropout": 0.1, "patience": 5,
        "seed": 0,
        "mner": {"train": "trainer/sample/mner/train.txt", "dev": "trainer/sample/mner/dev.txt",
                 "test": "trainer/sample/mner/test.txt", "max_len": 128},
        "mre": {"train": "trainer/sample/mre/train.txt", "dev": "trainer/sample/mre/dev.txt",
                "test": "trainer/sample/mre/test.txt", "rel2id": "trainer/sample/mre/rel2id.json",
                "max_len": 128},
    },
}  # fmt: skip
BEFORE_DEMO_COMMANDS = {
    "pretrain": "--params params.yaml --shards shards --preset tiny --out checkpoints/pretrain "
    "--metrics metrics/pretrain.json --report runs/dvc/pretrain_report.json "
    "--live-dir dvclive/pretrain --plot reports/pretrain_loss.png",
    "finetune-mner": "--params params.yaml --task mner --out checkpoints/finetune-mner "
    "--metrics metrics/mner.json --plot reports/finetune_mner.png",
    "finetune-mre": "--params params.yaml --task mre --out checkpoints/finetune-mre "
    "--metrics metrics/mre.json --plot reports/finetune_mre.png",
}


def stage_config(stage: str, argv: list[str]):
    """The settings a trainer stage's command resolves (code defaults < params.yaml < flags)."""
    if stage == "pretrain":
        return run.parse_args(argv)[0]
    return finetune.parse_args(argv)[0]


@pytest.mark.parametrize("stage", sorted(BEFORE_DEMO_COMMANDS))
def test_each_dvc_stage_resolves_the_settings_it_ran_before_the_demo_group(
    tmp_path, monkeypatch, stage
):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(BEFORE_DEMO_PARAMS))
    monkeypatch.chdir(tmp_path)  # paths stay as written: the params file is in the cwd
    before = stage_config(stage, shlex.split(BEFORE_DEMO_COMMANDS[stage]))
    monkeypatch.chdir(REPO)
    now = stage_config(stage, dvc_stage_argv(stage))
    assert dataclasses.asdict(now) == dataclasses.asdict(before)
    # and the values are the same types (1e-3 from a flag is the float YAML gave)
    assert {k: type(v) for k, v in vars(now).items()} == {
        k: type(v) for k, v in vars(before).items()
    }


def test_dvc_renders_the_stage_commands_as_these_tests_read_them():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        rendered = {s.name: s.cmd for s in repo.index.stages if Path(s.path).parent == REPO}
    import shlex

    for stage in BEFORE_DEMO_COMMANDS:
        assert shlex.split(rendered[stage])[2:] == dvc_stage_argv(stage), stage


def test_writing_a_dvc_output_by_hand_is_refused_unless_forced(tmp_path, monkeypatch, capsys):
    project = write_project(tmp_path / "p", {}, ["checkpoints/pretrain", "metrics/pretrain.json"])
    monkeypatch.chdir(project)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    shards = make_shards(tmp_path)
    code = run.main(["--shards", str(shards), "--out", "checkpoints/pretrain"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 2, err
    assert "would overwrite checkpoints/pretrain, an output of the DVC stage `pretrain`" in err
    outputs = {"--metrics": "metrics/pretrain.json"}
    with pytest.raises(InputError, match="metrics/pretrain.json"):
        refuse_dvc_outputs(outputs, force=False)
    with pytest.raises(InputError):  # a folder that holds a tracked output counts too
        refuse_dvc_outputs({"--live-dir": "metrics"}, force=False)
    refuse_dvc_outputs(outputs, force=True)
    refuse_dvc_outputs({"--out": "runs/pretrain/model"}, force=False)  # the default: fine
    monkeypatch.setenv("DVC_STAGE", "pretrain")
    refuse_dvc_outputs(outputs, force=False)


def make_shards(tmp_path: Path) -> Path:
    from pipeline.random_shards import write_random_shards

    return write_random_shards(tmp_path / "shards", n_samples=4, samples_per_shard=4)


def broken(tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    if case == "empty":
        folder.mkdir()
    elif case != "absent":
        folder = make_shards(tmp_path)
        if case == "missing-shard":
            (folder / "shard-000000.tar").unlink()
        elif case == "bad-sizes":
            (folder / "sizes.json").write_text("{not json")
        elif case == "no-samples":
            (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": 0}))
        elif case == "no-entities":
            (folder / "entities.json").unlink()
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no shards here: {dir} has no sizes.json; label the pairs first"),
        ("absent", "--shards {dir}: no such folder"),
        ("missing-shard", "1 shard(s) listed in sizes.json are missing (shard-000000.tar)"),
        ("bad-sizes", "sizes.json is not readable JSON"),
        ("no-samples", "lists 1 shards with 0 samples"),
        ("no-entities", "entities.json missing: the shard folder is incomplete"),
    ],
)
def test_pretrain_input_errors_are_one_or_two_lines_and_exit_2(tmp_path, capsys, case, message):
    folder = broken(tmp_path, case)
    code = run.main(["--params", "none", "--shards", str(folder), "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2
    assert message.format(dir=folder) in err, err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label-mass", "even"], "--label-mass 'even': choose one of ['spread', 'renormalise']"),
        (["--lambda-itm", "0", "--lambda-cit", "0", "--lambda-coe", "0", "--lambda-cir", "0"],
         "every loss weight is 0: nothing to train"),
        (["--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--accum", "0"], "--accum 0: must be >= 1"),
        (["--device", "gpu"], "--device 'gpu': use auto, cpu, cuda or cuda:N"),
        (["--preset", "huge"], "--preset 'huge': choose one of ['base', 'small', 'tiny']"),
        (["--max-len", "1000"], "--max-len 1000: must be in [2, 512]"),
    ],
)  # fmt: skip
def test_pretrain_bad_values_are_refused_before_anything_runs(tmp_path, capsys, flags, message):
    code = run.main(["--params", "none", "--shards", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_script_exits_2_on_an_empty_folder_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = script("run", "--shards", "empty", cwd=tmp_path)
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("import time:")]
    assert proc.returncode == 2 and lines == [
        "error: no shards here: empty has no sizes.json; label the pairs first: "
        "`pipeline label-objects --out DIR` (or `dvc repro`)"
    ]
    assert "torch" not in imported(proc.stderr)  # it failed before loading torch
    proc = script("run", "--shards", "empty", "--debug", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_finetune_defaults_and_paths_come_from_params_yaml(monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())["finetune"]
    monkeypatch.chdir(REPO / "trainer")  # params.yaml in the parent: its paths are the project's
    cfg, seeds, _ = finetune.parse_args(["--task", "mre", "--epochs", "2"])
    assert seeds is None and cfg.epochs == 2 and cfg.batch_size == params["batch_size"]
    assert Path(cfg.train).resolve() == (REPO / params["mre"]["train"]).resolve()
    assert Path(cfg.train).is_file() and not Path(cfg.train).is_absolute()
    assert cfg.images is None  # "" in params.yaml: text-only
    assert str(cfg.output_paths()["out"]) == "runs/finetune-mre"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--task is required: mner or mre"),
        (["--task", "mner"], "--train, --dev, --test required"),
        (["--task", "mner", "--train", "nope.txt", "--dev", "d", "--test", "t"],
         "--train nope.txt: no such file"),
        (["--task", "mner", "--init", "no/such/checkpoint", "--train", "{s}/train.txt",
          "--dev", "{s}/dev.txt", "--test", "{s}/test.txt"], "--init no/such/checkpoint: no such "
         "folder (pretrain first"),
        (["--task", "mner", "--warmup", "2", "--train", "{s}/train.txt", "--dev",
          "{s}/dev.txt", "--test", "{s}/test.txt"], "--warmup 2.0: a fraction of the steps"),
    ],
)  # fmt: skip
def test_finetune_bad_arguments_exit_2_with_one_line(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)  # outside the project: code defaults
    sample = str(REPO / "trainer" / "sample" / "mner")
    code = finetune.main([f.format(s=sample) for f in flags])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr less python -X importtime's report: what the user sees."""
    return [x for x in proc.stderr.splitlines() if not x.startswith("import time:")]


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("value", ["abc", 1.5, None, [4]])
def test_pretrain_refuses_a_sizes_table_without_whole_counts(tmp_path, value):
    folder = make_shards(tmp_path)
    (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": value}))
    proc = script("run", "--shards", str(folder), "--out", "o", cwd=tmp_path)
    shown = json.dumps(value)
    assert_one_line_error(proc, f"entry 'shard-000000.tar': {shown} is not a sample count")
    assert str(folder / "sizes.json") in error_lines(proc)[0]


def rewrite_samples(folder: Path, change) -> None:
    """Rewrite every shard of `folder` with `change(sample)` applied (None drops it)."""
    from pmu import shards

    for path in shards.shard_paths(folder):
        samples = [change(shards.decode_sample(raw)) for raw in shards.iter_raw_samples(path)]
        kept = [
            shards.LabelledSample(s["meta"]["id"], s["jpg"], s["caption"], s["meta"],
                                  s["ent_idx"], s["ent_prob"], s["rel_idx"], s["rel_prob"])
            for s in samples if s is not None
        ]  # fmt: skip
        shards.write_shard(path, kept)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: None, "the shards hold no samples (sizes.json says 4)"),
        (lambda s: {**s, "caption": " "}, "no valid sample: all 4 rejected (most often, 4x: "
         "ValueError: empty caption)"),
    ],
    ids=["empty-tars", "every-sample-invalid"],
)  # fmt: skip
def test_pretrain_on_shards_without_a_valid_sample_exits_2_with_one_line(tmp_path, change, message):
    folder = make_shards(tmp_path)
    rewrite_samples(folder, change)
    args = ["--params", "none", "--shards", str(folder), "--out", "o/model", "--threads", "1"]
    args += ["--metrics", "o/m.json", "--report", "o/r.json", "--live-dir", "", "--plot", ""]
    proc = script("run", *args, "--num-workers", "0", cwd=tmp_path)
    assert_one_line_error(proc, f"--shards {folder}: {message}")
