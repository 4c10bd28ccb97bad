"""The student ViT's stand-in pretraining: it learns the world's objects, and its folder loads
through the same code the trainer uses for `--vision-encoder`."""

import json

import pytest
import torch

from pipeline.world import build_world
from trainer.vision_init import VisionInitConfig, main, train_vision


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit-world")
    build_world(root / "w", n=8, seed=3, n_adapt=320, mner=(2, 1, 1), mre=(2, 1, 1))
    return root / "w"


def test_learns_objects_and_loads_as_the_students_vit(world, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "vit"
    cfg = VisionInitConfig(
        annotations=str(world / "adapt" / "truth.jsonl"),
        out=str(out),
        preset="small",
        steps=200,
        batch_size=32,
        lr=2e-3,
        warmup_steps=10,
        holdout=0.25,
        threads=1,
    )
    report = train_vision(cfg)
    assert report["images"] == {"train": 240, "held_out": 80}
    first, last = report["history"][0], report["history"][-1]
    assert last["object"] < 0.8 * first["object"], report["history"]
    # well above always naming the most frequent class (person, in most relations)
    rows = [json.loads(line) for line in (world / "adapt" / "truth.jsonl").open()]
    classes = [c for r in rows for c in r["classes"]]
    majority = max(classes.count(c) for c in set(classes)) / len(classes)
    assert report["held_out_object_top1"] > majority + 0.05, (report, majority)
    assert json.loads((tmp_path / "vit.json").read_text())["classes"] == report["classes"]

    from trainer.factory import build_model
    from trainer.model import ModelConfig

    model = build_model(ModelConfig(preset="tiny", vision_encoder=str(out)))  # any BERT
    saved = {k: v for k, v in model.vit.state_dict().items()}
    from transformers import ViTModel

    direct = ViTModel.from_pretrained(str(out), add_pooling_layer=False).state_dict()
    assert all(torch.equal(saved[k], direct[k]) for k in direct)
    assert model.cfg.image_mean == [0.5, 0.5, 0.5] and model.cfg.image_std == [0.5, 0.5, 0.5]
    assert not list(tmp_path.glob(".*partial"))


def test_cli_refuses_what_cannot_work(tmp_path, capsys):
    assert main(["--annotations", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    args = ["--annotations", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "base"]
    assert main(args) == 2
    assert "pretrained ViT" in capsys.readouterr().err


def test_cnn_learns_objects_and_loads_as_the_hvp_cnn(world, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "cnn.safetensors"
    cfg = VisionInitConfig(
        annotations=str(world / "adapt" / "truth.jsonl"),
        out=str(out),
        preset="tiny",
        arch="resnet10",
        steps=30,
        batch_size=32,
        lr=2e-3,
        warmup_steps=5,
        holdout=0.25,
        threads=1,
    )
    report = train_vision(cfg)
    rows = [json.loads(line) for line in (world / "adapt" / "truth.jsonl").open()]
    classes = [c for r in rows for c in r["classes"]]
    majority = max(classes.count(c) for c in set(classes)) / len(classes)
    assert report["held_out_object_top1"] > majority + 0.1, (report, majority)

    from safetensors.torch import load_file

    from trainer.factory import build_model
    from trainer.model import ModelConfig

    model = build_model(ModelConfig(preset="tiny", fusion="hvp", vision_encoder=str(out)))
    saved = load_file(str(out))
    loaded = model.cnn.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert model.cfg.vision_arch == "resnet10" and model.cfg.image_size == 64
    assert not list(tmp_path.glob(".*partial"))
