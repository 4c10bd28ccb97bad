"""Fig. 5: the entity tokens' attention to the image, from fine-tuned MNER models of either
fusion, with eager attention (the weights SDPA does not return)."""

import json

import numpy as np
import pytest
import torch

from pipeline.world import build_world
from trainer.finetune_config import FinetuneConfig
from trainer.finetune_loop import run_finetune
from trainer.plot_attention import key_share, load_finetuned, main, visual_attention


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention-world")
    build_world(root / "w", n=8, seed=4, n_adapt=8, mner=(16, 8, 16), mre=(4, 4, 4))
    return root / "w"


def finetuned(world, out, fusion: str, **extra):
    d = world / "mner"
    cfg = FinetuneConfig(
        task="mner", train=str(d / "train.txt"), dev=str(d / "dev.txt"), test=str(d / "test.txt"),
        images=str(d / "images"), init="tiny", fusion=fusion, out=str(out), epochs=1,
        batch_size=8, patience=0, threads=1, device="cpu", save_model=True, **extra,
    )  # fmt: skip
    run_finetune(cfg)
    return out / "model"


def test_draws_the_case_study_for_both_fusions(world, tmp_path):
    from pipeline.models import save_tiny_detector

    detector = save_tiny_detector(tmp_path / "det.pt")
    albef = finetuned(world, tmp_path / "albef", "albef")
    hvp = finetuned(world, tmp_path / "hvp", "hvp", detector=str(detector),
                    detector_preset="tiny", detector_imgsz=64, detector_conf=0.0)  # fmt: skip
    out, metrics = tmp_path / "att.png", tmp_path / "att.json"
    args = ["--world", str(world), "--model", f"albef={albef}", "--model", f"hvp={hvp}",
            "--n", "2", "--out", str(out), "--metrics", str(metrics)]  # fmt: skip
    assert main(args) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    m = json.loads(metrics.read_text())
    assert m["sentences"] == 2 and set(m["right"]) == {"albef", "hvp"}
    assert all(0 <= v <= 1 for v in m["key_object_share"].values())


def test_hvp_weights_cover_the_image_and_its_crops(world, tmp_path):
    from pipeline.models import save_tiny_detector

    detector = save_tiny_detector(tmp_path / "det.pt")
    folder = finetuned(world, tmp_path / "hvp", "hvp", detector=str(detector),
                       detector_preset="tiny", detector_imgsz=64, detector_conf=0.0)  # fmt: skip
    model, tokenizer, head, labels = load_finetuned(folder, "cpu")
    assert head is not None and labels[0] in ("O", "B-PER", "I-PER", "B-LOC")
    enc = tokenizer(["Big day for Kestrel !"], return_tensors="pt")
    pixels = torch.randint(0, 256, (1, 3, model.cfg.image_size, model.cfg.image_size),
                           dtype=torch.uint8)  # fmt: skip
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9], [0, 0, 0, 0]]])
    with torch.no_grad():
        _, grid, crops = visual_attention(model, enc.input_ids, enc.attention_mask, pixels,
                                          boxes, [4])  # fmt: skip
    assert grid.shape == (2, 2) and len(crops) == 3
    assert max(grid.max(), max(crops)) == pytest.approx(1.0)
    assert crops[2] == 0.0  # the padding box is masked out


def test_key_share_counts_the_cells_inside_the_box_and_its_crop():
    grid = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert key_share(grid, [], [0.0, 0.0, 0.5, 0.5]) == pytest.approx(0.5)
    assert key_share(grid, [2.0], [0.0, 0.0, 0.5, 0.5]) == pytest.approx(0.75)
