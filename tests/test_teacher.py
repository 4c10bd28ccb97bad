"""adapt-teacher on a small synthetic world: the loss falls, held-out accuracy is reported, a
resumed run ends with the same weights, and the result loads as `models.clip`."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models import clip_identity, load_clip
from pipeline.prepare import prepare
from pipeline.prompts import named_templates
from pipeline.readers.world import read_world
from pipeline.settings import AdaptTeacherSettings, TeacherParams
from pipeline.teacher import adapt_teacher, collect_data, score_teacher, window_keeping_boxes
from pipeline.world import build_world
from pmu.errors import InputError

PARAMS = TeacherParams(steps=30, batch_size=16, lr=2e-3, warmup_steps=3, holdout=0.2)


def teach(out, world, params=PARAMS, templates=("1", "A"), **kw):
    """adapt-teacher's settings for the test world (templates 1 and A unless given)."""
    return AdaptTeacherSettings(
        out=str(out),
        pairs=str(world["pairs"]),
        annotations=str(world["annotations"]),
        entity_templates=templates[0],
        relation_templates=templates[1],
        params=params,
        **kw,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    build_world(root / "w", n=16, n_adapt=40, mner=(2, 1, 1), mre=(2, 1, 1), image_size_px=64)
    prepare(read_world(str(root / "w" / "adapt")), root / "adapt", progress=False)
    return {
        "pairs": root / "adapt" / "pairs.parquet",
        "annotations": root / "w" / "adapt" / "truth.jsonl",
        "root": root,
    }


def test_data_holds_captions_crops_relations_and_a_held_out_share(world):
    data = collect_data(world["pairs"], world["annotations"], 0.2, 0)
    assert len(data.classes) >= 8 and data.relation_labels
    assert len(data.held_relations) == 8 and len(data.relations) == 32  # 20% of 40 images
    held = {os.path.realpath(it[0]) for it in data.held_relations}
    assert not held & {os.path.realpath(it[0]) for it in data.crops}  # never trained on
    # nor are their captions (pairs.parquet holds every adapt image): matched pairs of the
    # other 32 images only
    assert len(data.captions) == 32
    assert not held & {os.path.realpath(image) for image, _ in data.captions}
    everything = collect_data(world["pairs"], world["annotations"], 0.0, 0)
    assert len(everything.captions) == 40


def test_windows_keep_every_box():
    boxes = [[20.0, 30.0, 50.0, 60.0], [70.0, 10.0, 90.0, 40.0]]
    for u in ([0, 0, 0, 0], [0.999] * 4, [0.5, 0.1, 0.7, 0.3]):
        left, top, right, bottom = window_keeping_boxes((100, 80), boxes, 1.0, u)
        assert left <= 20 and top <= 10 and right >= 90 and bottom >= 60
    assert window_keeping_boxes((100, 80), boxes, 1.0, [0.999] * 4) == (19, 9, 91, 61)
    assert window_keeping_boxes((100, 80), boxes, 0.0, [0.999] * 4) == (0, 0, 100, 80)
    assert window_keeping_boxes((100, 80), [], 1.0, [0.5] * 4) == (0, 0, 100, 80)


def test_each_template_is_trained_and_scored(world, tmp_path):
    out = tmp_path / "teacher.safetensors"
    entity, relation = named_templates("all", "entity"), named_templates("all", "relation")
    params = TeacherParams(**{**PARAMS.__dict__, "steps": 4, "flip": True, "crop_margin": 1.0})
    s = adapt_teacher(teach(out, world, params, ("all", "all")), progress=False)
    per = s["held_out"]["per_template"]
    assert set(per["entity"]) == {"1", "2"} and set(per["relation"]) == {"A", "B", "C"}
    scored = score_teacher(out, world["annotations"], "tiny", entity, relation)
    assert scored["relation_images"] == 40 and set(scored["per_template"]["relation"]) == {
        "A", "B", "C"
    }  # fmt: skip


def test_loss_falls_and_outputs_load_as_the_clip(world, tmp_path):
    out = tmp_path / "teacher.safetensors"
    s = adapt_teacher(teach(out, world), progress=False)
    first, last = s["loss_first"], s["loss_last"]
    assert set(first) == {"step", "caption", "entity", "scene", "relation", "probe"}
    assert last["entity"] < first["entity"] and last["caption"] < first["caption"]
    assert s["held_out"]["entity_top1"] is not None
    assert (tmp_path / "teacher.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "teacher.json").read_text())
    assert saved["weights_sha256"] == clip_identity("tiny", out)["weights"]
    assert not (tmp_path / "teacher.state").exists()  # removed once the weights are written
    # the same code path labeling uses loads it; the weights moved from the random start
    model, _, _ = load_clip("tiny", out)
    start, _, _ = load_clip("tiny")
    assert not torch.equal(model.visual.conv1.weight, start.visual.conv1.weight)
    assert torch.equal(model.visual.conv1.weight, load_file(out)["visual.conv1.weight"])


def test_resumed_run_ends_with_the_same_weights(world, tmp_path):
    full = tmp_path / "full.safetensors"
    adapt_teacher(teach(full, world), progress=False)
    part = tmp_path / "part.safetensors"
    stopped = adapt_teacher(teach(part, world, ckpt_every=10), stop_after_steps=20, progress=False)
    assert stopped["interrupted_after_step"] == 20 and not part.exists()
    adapt_teacher(teach(part, world, ckpt_every=10, resume=True), progress=False)
    assert part.read_bytes() == full.read_bytes()
    a = json.loads((tmp_path / "full.json").read_text())
    b = json.loads((tmp_path / "part.json").read_text())
    assert a["history"] == b["history"]
    # a resume with other parameters is refused
    adapt_teacher(teach(part, world, ckpt_every=10), stop_after_steps=10, progress=False)
    other = TeacherParams(**{**PARAMS.__dict__, "lr": 1e-3})
    with pytest.raises(InputError, match="--resume refused"):
        adapt_teacher(teach(part, world, other, resume=True), progress=False)


def test_cli_errors_are_one_line(world, tmp_path):
    res = CliRunner().invoke(app, ["adapt-teacher", "--out", str(tmp_path / "t.safetensors")])
    assert res.exit_code == 2 and "--pairs" in res.output
    res = CliRunner().invoke(app, ["adapt-teacher", "--pairs", str(tmp_path / "missing.parquet")])
    assert res.exit_code == 2 and "no such file" in res.output
