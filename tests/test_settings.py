"""Every stage setting is declared once (pipeline/settings.py) and reaches the user: each field
is an option of its command, and each one a DVC stage runs is set by params.yaml or by the
stage's command in dvc.yaml, unless listed below as deliberately absent."""

import dataclasses
import shlex

import pytest
import typer
import yaml
from conftest import REPO_ROOT
from typer.testing import CliRunner

from pipeline import settings as st
from pipeline.cli import app
from pipeline.command import REGISTERED, settings_fields, stage_command
from pmu.settings import opt

# Settings that neither params.yaml nor dvc.yaml sets, and why.
ABSENT = {
    "progress": "a terminal display, not a result",
    "device": "where a stage runs is the machine's choice (auto: CUDA when present)",
    "ray_address": "a cluster belongs to the machine running it (or $RAY_ADDRESS)",
    "ray_actors": "sized to the cluster at hand",
    "ray_cpus_per_actor": "sized to the cluster at hand",
    "ray_gpus_per_actor": "sized to the cluster at hand",
    "stage_params": "would record params.yaml itself in the manifest",
    "tol": "verify's tolerance is the contract's, fixed for `dvc repro`",
    "limit": "how many problems verify lists: display only",
    "quick": "`dvc repro` always checks the hashes",
}


def dvc_stages() -> dict[str, dict]:
    doc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    return doc["stages"]


def pipeline_stage_commands() -> list[tuple[str, str, list[str]]]:
    """(DVC stage, pipeline command, its argv after the command) of every pipeline stage."""
    out = []
    for name, stage in dvc_stages().items():
        argv = shlex.split(stage["cmd"])
        if argv[:3] == ["python", "-m", "pipeline"]:
            out.append((name, argv[3], argv[4:]))
    return out


def test_every_setting_is_an_option_of_its_command():
    runner = CliRunner()
    assert set(REGISTERED) >= {"prepare", "detect-objects", "label-objects", "adapt-teacher"}
    for command, (cls, _) in REGISTERED.items():
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        for f, _ in settings_fields(cls):
            flag = (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))[0]
            shown = flag.split("/")[0] if not f.metadata.get("argument") else f.name.upper()
            assert shown in result.output, (command, f.name)


@pytest.mark.parametrize(("stage", "command", "argv"), pipeline_stage_commands())
def test_every_setting_a_dvc_stage_runs_is_set_by_params_yaml_or_dvc_yaml(stage, command, argv):
    cls, groups = REGISTERED[command]
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    from_params = {k for g in groups for k in (params.get(g) or {})}
    if groups:
        assert "--params" in argv, f"{stage}: pass --params params.yaml"
        declared = {k for g in groups if g != "models" for k in params.get(g, {})}
        assert dvc_stages()[stage].get("params"), f"{stage}: list its params groups"
        assert declared <= {f.name for f, _ in settings_fields(cls)}
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    positional = [a for a in argv if not a.startswith("--")]
    unreachable = []
    for f, _ in settings_fields(cls):
        option = (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))[0]
        given = option.split("/")[0] in flags or (f.metadata.get("argument") and positional)
        if not (given or f.name in from_params or f.name in ABSENT):
            unreachable.append(f.name)
    assert not unreachable, f"{stage}: neither params.yaml nor dvc.yaml sets {unreachable}"


def test_a_new_field_shows_up_in_help_and_reaches_the_stage_with_no_other_edit(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Extended(st.InspectSettings):
        brand_new: int = opt(7, "A setting added to a stage's dataclass.", min=1)

    seen = {}
    demo = typer.Typer()

    @stage_command(demo, "inspect", Extended, groups=("inspect",))
    def cmd(s: Extended) -> None:
        seen["settings"] = s

    @demo.command("other")
    def other() -> None:  # a second command keeps `inspect` a sub-command
        pass

    runner = CliRunner()
    help_text = runner.invoke(demo, ["inspect", "--help"], terminal_width=200).output
    assert "--brand-new" in help_text and "A setting added" in help_text
    assert runner.invoke(demo, ["inspect", "shards", "--brand-new", "3"]).exit_code == 0
    assert seen["settings"].brand_new == 3 and seen["settings"].shard_dir == "shards"
    # and params.yaml's group sets it, while a flag still wins
    params = tmp_path / "params.yaml"
    params.write_text("inspect:\n  brand_new: 5\n  samples: 2\n", encoding="utf-8")
    assert runner.invoke(demo, ["inspect", "x", "--params", str(params)]).exit_code == 0
    assert (seen["settings"].brand_new, seen["settings"].samples) == (5, 2)
    args = ["inspect", "x", "--params", str(params), "--samples", "9"]
    assert runner.invoke(demo, args).exit_code == 0 and seen["settings"].samples == 9
    params.write_text("inspect:\n  brand_new: five\n", encoding="utf-8")
    result = runner.invoke(demo, ["inspect", "x", "--params", str(params)])
    assert result.exit_code != 0 and "brand_new = 'five' is not a int" in str(result.exception)


def test_params_yaml_values_are_type_checked_and_unknown_keys_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("label:\n  tau: warm\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["label-objects", "--params", str(params)])
    assert result.exit_code == 2 and "tau = 'warm' is not a float" in result.output
    params.write_text("label:\n  temperature: 2\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["label-objects", "--params", str(params)])
    assert result.exit_code == 2 and "unknown `label` settings ['temperature']" in result.output


# params.yaml's `demo:` groups: the bundled sample's tiny-model values, which only the DVC stages
# read, as flags over the trainer's own group (a key not passed would be silently ignored)
DEMO_STAGES = {"pretrain": ("pretrain",), "finetune": ("finetune-mner", "finetune-mre")}


def test_every_demo_value_is_a_flag_of_its_dvc_stages_and_a_declared_param():
    from trainer.finetune_config import FinetuneConfig
    from trainer.pretrain_config import TrainConfig

    demo = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))["demo"]
    assert set(demo) == set(DEMO_STAGES)
    fields = {"pretrain": TrainConfig, "finetune": FinetuneConfig}
    for group, stages in DEMO_STAGES.items():
        assert set(demo[group]) <= {f.name for f in dataclasses.fields(fields[group])}
        for stage in stages:
            cmd = " ".join(dvc_stages()[stage]["cmd"].split())
            for key in demo[group]:
                assert f"--{key.replace('_', '-')} ${{demo.{group}.{key}}}" in cmd, (stage, key)
            assert f"demo.{group}" in dvc_stages()[stage]["params"], stage
