"""Fig. 3 alignment plot from a tiny saved student and synthetic shards."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.random_shards import write_random_shards
from pmu.errors import InputError
from trainer import plot_alignment as pa


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from trainer.factory import build_model, build_tokenizer, save_pretrained
    from trainer.model import ModelConfig

    torch.set_num_threads(1)
    cfg = ModelConfig(preset="tiny", n_entities=20, n_relations=10, proj_dim=32)
    path = tmp_path_factory.mktemp("ckpt") / "pretrain"
    return save_pretrained(build_model(cfg), build_tokenizer(cfg), cfg, path)


def _non_blank(path) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    return pixels


def test_plot_is_written_with_both_modalities(tiny_checkpoint, synthetic_shards, tmp_path):
    out = tmp_path / "reports" / "alignment.png"
    summary = pa.plot_alignment(tiny_checkpoint, synthetic_shards, out, n_images=100, seed=0)
    pixels = _non_blank(out)
    assert pixels.shape[:2] == (560, 1200)
    samples = pa.sample_images(synthetic_shards, 100, 0)
    assert summary["images"] == len(samples) == 16
    top1 = [int(e) for s in samples for e in np.atleast_2d(s["ent_idx"])[:, 0] if s["ent_idx"].size]
    assert summary["objects"] == len(top1) > 0  # every crop kept: all top-1s fit in 40 entities
    assert summary["entities"] == len(set(top1))
    assert summary["relations"] == len({int(s["rel_idx"][0]) for s in samples})
    assert 0.0 <= summary["nearest_prompt_acc_entity"] <= 1.0
    # the same inputs and seed give the same picture
    again = tmp_path / "again.png"
    pa.plot_alignment(tiny_checkpoint, synthetic_shards, again, n_images=100, seed=0)
    assert again.read_bytes() == out.read_bytes()


def test_cli_writes_png_and_metrics(tiny_checkpoint, tmp_path):
    shard_dir = write_random_shards(tmp_path / "s", n_samples=12, max_objects=2, seed=3)
    out, metrics = tmp_path / "a.png", tmp_path / "a.json"
    summary = pa.main([
        "--checkpoint", str(tiny_checkpoint), "--shards", str(shard_dir), "--out", str(out),
        "--metrics", str(metrics), "--images", "8", "--max-entities", "3", "--threads", "1",
    ])  # fmt: skip
    _non_blank(out)
    assert json.loads(metrics.read_text()) == summary
    assert summary["images"] == 8 and summary["entities"] <= 3


def test_no_objects_leaves_one_panel_and_nothing_at_all_is_a_clear_error(tiny_checkpoint, tmp_path):
    shard_dir = write_random_shards(tmp_path / "s", n_samples=6, max_objects=0)
    summary = pa.plot_alignment(tiny_checkpoint, shard_dir, tmp_path / "a.png", n_images=6)
    assert summary["objects"] == 0 and summary["images"] == 6
    assert summary["nearest_prompt_acc_entity"] is None
    _non_blank(tmp_path / "a.png")
    with pytest.raises(InputError, match="t-SNE needs at least 4 points"):
        pa.plot_alignment(tiny_checkpoint, shard_dir, tmp_path / "b.png", n_images=1)


def test_nearest_prompt_accuracy():
    prompts = np.eye(3, 4)
    points = np.array([[1, 0.1, 0, 0], [0, 0, 1, 0], [0.9, 0, 0.1, 0]])
    assert pa.nearest_prompt_accuracy(points, [0, 2, 0], prompts) == 1.0
    assert pa.nearest_prompt_accuracy(points, [1, 2, 2], prompts) == pytest.approx(1 / 3)


def test_label_spots_keep_clustered_labels_apart():
    anchors = [(100.0, 100.0)] * 6 + [(102.0, 99.0)] * 4  # ten prompts on (almost) one point
    spots = pa.label_spots(anchors, [(40.0, 10.0)] * 10, (0.0, 0.0, 400.0, 300.0))
    for i, a in enumerate(spots):
        assert 0 <= a[0] and a[2] <= 400 and 0 <= a[1] and a[3] <= 300
        assert not any(pa._overlaps(a, b, pad=0) for b in spots[:i]), (i, spots)
    assert spots[0] == (103.0, 103.0, 143.0, 113.0)  # the first: just above right of its point


def test_prompt_labels_in_the_plot_do_not_overlap():
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.normal(size=(30, 2)), rng.normal(scale=0.02, size=(12, 2))])
    fig = Figure(figsize=(6, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    names = [f"prompt number {i}" for i in range(12)]
    pa._panel(ax, xy, 30, names, 12, "title", "images", "prompts")
    pa.spread_labels(fig)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_gid() == "prompt-label"]
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, not its line
    assert len(boxes) == 12
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[:i]), i
