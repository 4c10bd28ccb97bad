"""label-objects: soft labels match an independent CLIP computation; resume is byte-identical."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from labeling_inputs import write_labeling_inputs

from pipeline.clip_inputs import reference_clip_input
from pipeline.images import decode_rgb
from pipeline.label import PROGRESS_DIR, label_objects, label_sharpness, sharpness_sums, soft_labels
from pipeline.labeling_data import padded_box, read_pairs, write_boxes
from pipeline.models import load_clip
from pipeline.prompts import embed_prompts, load_prompts
from pipeline.settings import LabelParams, LabelSettings
from pipeline.verify import verify_shards
from pmu import shards
from pmu.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PARAMS = dict(
    samples_per_shard=4,
    image_batch_size=3,
    crop_batch_size=5,
    num_workers=0,
    k_ent=4,
    k_rel=3,
    crop_padding=0.1,
    max_side=80,
)


def clip_input(img, preprocess, mode="letterbox"):
    return reference_clip_input(img, preprocess, mode)


def _crafted_boxes(pairs_path: Path, out: Path, n_boxes=lambda i: i % 3) -> Path:
    """boxes.parquet with known boxes (0, 1 or 2 per image) instead of the random detector's."""
    pairs = read_pairs(pairs_path)
    rows = []
    for i, (sid, w, h) in enumerate(zip(pairs["id"], pairs["width"], pairs["height"], strict=True)):
        boxes = [[5.0, 4.0, w / 2, h / 2], [w / 3, h / 4, w - 1.0, h - 2.0]][: n_boxes(i)]
        rows.append(
            {
                "id": sid,
                "width": w,
                "height": h,
                "boxes": boxes,
                "classes": ["dog", "car"][: len(boxes)],
                "confs": [0.9, 0.6][: len(boxes)],
                "error": None,
            }
        )
    write_boxes(out, rows, {"preset": "test", "detector": {"source": "crafted"}, "params": {}})
    return out


def _inputs(root: Path, n: int, broken=(), **kw) -> dict:
    paths = write_labeling_inputs(root, n=n, broken=broken, **kw)
    paths["boxes"] = _crafted_boxes(paths["pairs"], root / "objects" / "boxes.parquet")
    paths["prompts"] = root / "vocab" / "prompts.safetensors"
    embed_prompts(paths["entities"], paths["relations"], paths["prompts"])
    return paths


def label_settings(paths: dict, out: Path, params: dict | None = None) -> LabelSettings:
    return LabelSettings(
        pairs=str(paths["pairs"]),
        boxes=str(paths["boxes"]),
        prompts=str(paths["prompts"]),
        entities=str(paths["entities"]),
        relations=str(paths["relations"]),
        out=str(out),
        rejected=str(paths["rejected"]),
        params=LabelParams(**{**PARAMS, **(params or {})}),
    )


def _label(paths: dict, out: Path, params: dict | None = None, **kw):
    return label_objects(label_settings(paths, out, params), progress=False, **kw)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _inputs(tmp_path_factory.mktemp("label"), n=10, broken=(5,))


def test_shards_hold_soft_labels_of_the_crops_and_images(inputs, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "shards"
    summary = _label(inputs, out)
    report = verify_shards(out)
    assert report.ok, report.render()
    c = summary["counts"]
    # pair-0005 is truncated: rejected here; one more rejection comes from prepare's file.
    assert (c["pairs"], c["samples"], c["shards"]) == (10, 9, 3)
    assert (c["rejected"], c["rejected_prepare"], c["rejected_label"]) == (2, 1, 1)
    assert json.loads((out / "sizes.json").read_text()) == {
        "shard-000000.tar": 4,
        "shard-000001.tar": 3,
        "shard-000002.tar": 2,
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"]["by_reason"] == {"caption: empty": 1, "image: truncated": 1}
    assert manifest["counts"]["images_without_objects"] == 4  # i in (0, 3, 6, 9)
    assert manifest["vocab"]["entities"]["size"] == 10 and not (out / PROGRESS_DIR).exists()
    assert "timing" not in json.dumps(manifest) and "seconds" not in json.dumps(manifest)
    assert (out / "entities.json").read_bytes() == inputs["entities"].read_bytes()
    # one sharpness figure per object (q_ent) and per labelled image (q_rel), from the full q
    sharp = manifest["label_sharpness"]
    assert sharp == summary["label_sharpness"]
    assert sharp["q_rel"]["labels"] == 9 and sharp["q_ent"]["labels"] == c["objects"]
    for kind in ("q_ent", "q_rel"):
        fig = sharp[kind]
        assert 0 < fig["mean_top1_mass"] <= 1
        assert fig["mean_mass_beyond_top1"] == pytest.approx(1 - fig["mean_top1_mass"], abs=2e-6)
        assert 0 <= fig["mean_entropy_nats"] <= fig["uniform_entropy_nats"]

    # Independent computation for pair-0001 (one box) and pair-0002 (two boxes).
    model, preprocess, _ = load_clip("tiny")
    prompts = load_prompts(inputs["prompts"])[0]
    samples = {
        s["meta"]["id"]: s
        for s in map(shards.decode_sample, shards.iter_raw_samples(out / "shard-000000.tar"))
    }
    pairs = read_pairs(inputs["pairs"])
    for i in (1, 2):
        sample = samples[pairs["id"][i]]
        image = decode_rgb(Path(pairs["image_path"][i]).read_bytes())
        w, h = image.size
        meta = sample["meta"]
        assert (meta["width"], meta["height"]) == (w, h) and meta["itm"] == 1
        boxes = [[5.0, 4.0, w / 2, h / 2], [w / 3, h / 4, w - 1.0, h - 2.0]][:i]
        np.testing.assert_allclose(
            meta["boxes"], [[x0 / w, y0 / h, x1 / w, y1 / h] for x0, y0, x1, y1 in boxes], atol=1e-6
        )
        # The reference path: per-sample PIL + open_clip preprocess, letterboxed (the default).
        crops = torch.stack(
            [clip_input(image.crop(padded_box(b, w, h, 0.1)), preprocess) for b in boxes]
        )
        with torch.inference_mode():
            crop_feats = F.normalize(model.encode_image(crops), dim=-1)
            image_input = clip_input(image, preprocess)[None]
            image_feats = F.normalize(model.encode_image(image_input), dim=-1)
        scale = model.logit_scale.exp().item()  # the model's own scale (tiny: 1/0.07)
        assert manifest["params"]["label_runtime"]["logit_scale"] == pytest.approx(scale)
        q_ent = torch.softmax(scale * crop_feats @ prompts["entity"].T, dim=-1)
        q_rel = torch.softmax(scale * image_feats @ prompts["relation"].T, dim=-1)[0]
        top_ent = torch.sort(q_ent, dim=-1, descending=True)
        assert sample["ent_idx"].shape == (i, 4) and sample["rel_idx"].shape == (3,)
        np.testing.assert_array_equal(sample["ent_idx"], top_ent.indices[:, :4].numpy())
        np.testing.assert_allclose(sample["ent_prob"], top_ent.values[:, :4].numpy(), atol=2e-4)
        np.testing.assert_array_equal(sample["rel_idx"], torch.argsort(-q_rel)[:3].numpy())
        np.testing.assert_allclose(meta["ent_mass"], top_ent.values[:, :4].sum(-1), atol=2e-4)
        stored = decode_rgb(sample["jpg"])
        assert max(stored.size) == 80  # longest side capped
        assert sample["caption"] == pairs["caption"][i]
    assert samples["pair-0000"]["ent_idx"].shape == (0, 4)  # no boxes: empty, not dropped


def test_workers_give_byte_identical_shards(inputs, tmp_path):
    _label(inputs, tmp_path / "a")
    _label(inputs, tmp_path / "b", params={"num_workers": 2})
    assert _folder_bytes(tmp_path / "a") == _folder_bytes(tmp_path / "b")


def test_interrupted_run_resumes_to_the_same_bytes(inputs, tmp_path):
    partial = _label(inputs, tmp_path / "resumed", stop_after_shards=1)
    assert partial == {"complete": False, "shards_written": 1, "shards_done": 1}
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    # A different tau must not reuse the shard made with the old one.
    changed = _label(inputs, tmp_path / "resumed", params={"tau": 0.5})
    assert changed["timing"]["shards_resumed"] == 0
    _label(inputs, tmp_path / "fresh", params={"tau": 0.5})
    assert _folder_bytes(tmp_path / "resumed") == _folder_bytes(tmp_path / "fresh")


CHILD = """
import sys, time
import pmu.shards as shards
from pipeline.label import label_objects
from pipeline.settings import LabelParams, LabelSettings

write = shards.write_shard
def slow_write(*args, **kwargs):  # give the parent time to kill us between shards
    n = write(*args, **kwargs)
    time.sleep(0.4)
    return n
shards.write_shard = slow_write
a = sys.argv[1:]
keys = ("pairs", "boxes", "prompts", "entities", "relations", "out", "rejected")
s = LabelSettings(**dict(zip(keys, a)), params=LabelParams(**{params}))
label_objects(s, progress=False)
"""


def test_killed_subprocess_resumes_to_the_same_bytes(tmp_path):
    paths = _inputs(tmp_path / "in", n=20)
    killed = tmp_path / "killed"
    args = [str(paths[k]) for k in ("pairs", "boxes", "prompts", "entities", "relations")]
    child = textwrap.dedent(CHILD).replace("{params}", repr(PARAMS))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", child, *args, str(killed), str(paths["rejected"])], env=env
    )
    marker = killed / PROGRESS_DIR / "shard-000000.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (killed / "manifest.json").exists()
    done_before = len(list((killed / PROGRESS_DIR).glob("*.json")))
    assert 1 <= done_before < 5

    resumed = _label(paths, killed)
    assert resumed["timing"]["shards_resumed"] == done_before
    _label(paths, tmp_path / "fresh")
    assert _folder_bytes(killed) == _folder_bytes(tmp_path / "fresh")
    assert verify_shards(killed).ok


def test_stale_prompts_are_refused(tmp_path):
    paths = _inputs(tmp_path / "in", n=2)
    data = json.loads(paths["entities"].read_text())
    data["entities"].append({"name": "zebra", "count": 1})
    paths["entities"].write_text(json.dumps(data))
    with pytest.raises(InputError, match="re-run `pipeline embed-prompts`"):
        _label(paths, tmp_path / "out")


def test_soft_labels_are_a_truncated_softmax_with_stable_ties():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    prompts = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]), dim=-1)
    idx, prob, mass, sharp = soft_labels(feats, prompts, logit_scale=10.0, tau=2.0, k=3)
    full = torch.softmax(5.0 * feats @ prompts.T, dim=-1)
    assert idx.dtype == torch.int32 and idx.tolist()[0] == [0, 2, 1]  # tie 0/2 keeps index order
    assert idx.tolist()[1] == [0, 1, 2]
    assert torch.allclose(prob, torch.gather(full, 1, idx.long()))
    assert torch.allclose(mass, prob.sum(-1)) and (mass < 1).all()
    # sharpness of the full distributions: top-1 mass and entropy in nats
    assert torch.allclose(sharp[:, 0], full.max(-1).values)
    assert torch.allclose(sharp[:, 1], -(full * full.log()).sum(-1))


def test_label_sharpness_on_a_hand_made_case():
    """Two labels of 4 relations: one-hot and uniform; three objects over 2 entities."""
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    uniform = torch.full((1, 4), 0.25)
    rel = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.25, math.log(4)]])]
    assert torch.allclose(rel[0], torch.stack([one_hot.max(-1).values, torch.zeros(1)], -1))
    assert math.isclose(float(-(uniform * uniform.log()).sum()), math.log(4), rel_tol=1e-6)
    ent = [torch.tensor([[0.5, math.log(2)], [1.0, 0.0]]), torch.tensor([[0.75, 0.5623]])]
    done = {
        0: {"sharpness": {"q_ent": sharpness_sums(ent[:1]), "q_rel": sharpness_sums(rel[:1])}},
        1: {"sharpness": {"q_ent": sharpness_sums(ent[1:]), "q_rel": sharpness_sums(rel[1:])}},
        2: {},  # a shard labelled by an older version: counted apart
    }
    figures = label_sharpness(done, {"entities": 2, "relations": 4})
    rel_fig, ent_fig = figures["q_rel"], figures["q_ent"]
    assert rel_fig["labels"] == 2 and rel_fig["mean_top1_mass"] == 0.625
    assert rel_fig["mean_mass_beyond_top1"] == 0.375
    assert rel_fig["mean_entropy_nats"] == pytest.approx(math.log(4) / 2, abs=1e-6)
    assert rel_fig["uniform_entropy_nats"] == pytest.approx(math.log(4), abs=1e-6)
    assert ent_fig["labels"] == 3 and ent_fig["mean_top1_mass"] == pytest.approx(0.75)
    assert ent_fig["mean_entropy_nats"] == pytest.approx((math.log(2) + 0.5623) / 3, abs=1e-6)
    assert rel_fig["shards_without_figures"] == 1


def test_padded_box_grows_clamps_and_never_collapses():
    assert padded_box([10, 10, 20, 30], 100, 100, 0.0) == (10, 10, 20, 30)
    assert padded_box([10, 10, 20, 30], 100, 100, 0.5) == (5, 0, 25, 40)
    assert padded_box([90.2, 5, 120, 99.5], 100, 100, 0.0) == (90, 5, 100, 100)
    assert padded_box([50, 50, 50, 50], 100, 100, 0.0) == (50, 50, 51, 51)
    assert padded_box([100, 100, 100, 100], 100, 100, 0.0) == (99, 99, 100, 100)
