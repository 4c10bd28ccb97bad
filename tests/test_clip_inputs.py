"""label-objects' CLIP inputs: uint8 transport, resize modes, device decode, logit scale.

Tolerances. Worker-made uint8 inputs normalised on the device equal the reference path's floats
exactly (torch.equal). Labels from a whole run match the reference within 2e-4 in probability
(CLIP runs batched there, one image at a time in the reference). `decode="device"` (torchvision
decode and antialiased bicubic resize instead of PIL) matches within 1e-3.
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from labeling_inputs import write_labeling_inputs
from PIL import Image
from safetensors.torch import save_file

from pipeline.clip_inputs import (
    ClipInputSpec,
    Normaliser,
    reference_clip_input,
    square_pil,
    square_tensor,
)
from pipeline.images import decode_rgb
from pipeline.label import label_objects, plan_labeling
from pipeline.labeling_data import (
    LabelDataset,
    LabelItemSpec,
    collate_label_batch,
    padded_box,
    read_pairs,
    write_boxes,
)
from pipeline.models import load_clip
from pipeline.prompts import embed_prompts, load_prompts
from pipeline.settings import LabelParams, LabelSettings
from pmu import shards
from pmu.errors import InputError

PARAMS = dict(samples_per_shard=4, image_batch_size=3, crop_batch_size=5, num_workers=0, k_ent=4)


@pytest.fixture(scope="module")
def clip():
    model, preprocess, _ = load_clip("tiny")
    return model, preprocess


def _shapes_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _write_boxes(pairs_path: Path, out: Path, boxes_of) -> Path:
    pairs = read_pairs(pairs_path)
    rows = []
    for i, (sid, w, h) in enumerate(zip(pairs["id"], pairs["width"], pairs["height"], strict=True)):
        boxes = boxes_of(i, w, h)
        rows.append(
            {
                "id": sid,
                "width": w,
                "height": h,
                "boxes": boxes,
                "classes": ["dog"] * len(boxes),
                "confs": [0.5] * len(boxes),
                "error": None,
            }
        )
    write_boxes(out, rows, {"preset": "test", "detector": {"source": "crafted"}, "params": {}})
    return out


def _two_boxes(i, w, h):
    return [[0.0, 0.0, w / 5, h * 0.9], [w / 3, h / 4, w - 1.0, h / 2]][: i % 3]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-inputs")
    paths = write_labeling_inputs(root, n=8)
    paths["boxes"] = _write_boxes(paths["pairs"], root / "boxes.parquet", _two_boxes)
    paths["prompts"] = root / "vocab" / "prompts.safetensors"
    embed_prompts(paths["entities"], paths["relations"], paths["prompts"])
    return paths


def _settings(paths, out, clip_path=None, prompts=None, **params) -> LabelSettings:
    return LabelSettings(
        pairs=str(paths["pairs"]),
        boxes=str(paths["boxes"]),
        prompts=str(prompts or paths["prompts"]),
        entities=str(paths["entities"]),
        relations=str(paths["relations"]),
        out=str(out),
        rejected=None,
        clip=str(clip_path) if clip_path else None,
        params=LabelParams(**{**PARAMS, **params}),
    )


def _label(paths, out, clip_path=None, prompts=None, **params):
    return label_objects(_settings(paths, out, clip_path, prompts, **params), progress=False)


def _samples(folder: Path) -> dict[str, dict]:
    return {
        s["meta"]["id"]: s
        for tar in shards.shard_paths(folder)
        for s in map(shards.decode_sample, shards.iter_raw_samples(tar))
    }


@pytest.mark.parametrize("mode", ["letterbox", "center_crop"])
def test_uint8_transport_round_trips_to_the_reference_floats(clip, inputs, mode):
    """Workers ship uint8 (through a real process boundary); normalised on the device they are
    the reference preprocess's floats, bit for bit."""
    _, preprocess = clip
    spec = ClipInputSpec.from_preprocess(preprocess, mode)
    pairs = read_pairs(inputs["pairs"])
    items = []
    for i in range(6):
        w, h = pairs["width"][i], pairs["height"][i]
        items.append(LabelItemSpec(pairs["image_path"][i], _two_boxes(i, w, h), w, h))
    dataset = LabelDataset(items, spec, 0.1, 80, 90, 10**8)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=3, num_workers=workers, collate_fn=collate_label_batch
        )
        batches[workers] = list(loader)
    normalise = Normaliser(spec, torch.device("cpu"))
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a["images"].dtype == torch.uint8 and a["crops"].dtype == torch.uint8
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["crops"], b["crops"])
        assert a["jpg"] == b["jpg"]
    crop_at = 0
    for batch in batches[0]:
        for j, i in enumerate(batch["index"]):
            img = decode_rgb(Path(items[i].image_path).read_bytes())
            expected = reference_clip_input(img, preprocess, mode)
            assert torch.equal(normalise(batch["images"][j : j + 1])[0], expected)
            for box in items[i].boxes:
                window = padded_box(box, img.width, img.height, 0.1)
                expected = reference_clip_input(img.crop(window), preprocess, mode)
                got = normalise(batch["crops"][crop_at : crop_at + 1])[0]
                assert torch.equal(got, expected)
                crop_at += 1
        crop_at = 0  # crops are per batch


def _reference_labels(paths, preprocess, model, mode, scale):
    """Per-sample PIL + open_clip preprocess, one image and one crop at a time."""
    prompts = load_prompts(paths["prompts"])[0]
    pairs = read_pairs(paths["pairs"])
    out = {}
    with torch.inference_mode():
        for i, sid in enumerate(pairs["id"]):
            img = decode_rgb(Path(pairs["image_path"][i]).read_bytes())
            boxes = _two_boxes(i, img.width, img.height)
            x = reference_clip_input(img, preprocess, mode)[None]
            q_rel = torch.softmax(
                scale * F.normalize(model.encode_image(x), dim=-1) @ prompts["relation"].T, -1
            )[0]
            q_ent = []
            for box in boxes:
                crop = img.crop(padded_box(box, img.width, img.height, 0.0))
                f = F.normalize(
                    model.encode_image(reference_clip_input(crop, preprocess, mode)[None]), dim=-1
                )
                q_ent.append(torch.softmax(scale * f @ prompts["entity"].T, -1)[0])
            out[sid] = (q_rel.numpy(), [q.numpy() for q in q_ent])
    return out


def _assert_top_k(idx, prob, q, tol):
    """Stored (idx, prob) are q's top-k: their reference probabilities match and no left-out
    entry beats the last kept one by more than tol."""
    np.testing.assert_allclose(prob, q[idx], atol=tol)
    np.testing.assert_allclose(prob, np.sort(q)[::-1][: len(idx)], atol=tol)


@pytest.mark.parametrize(
    "mode, decode, tol",
    [
        ("letterbox", "workers", 2e-4),
        ("center_crop", "workers", 2e-4),
        ("letterbox", "device", 1e-3),
        ("center_crop", "device", 1e-3),
    ],
)
def test_labels_match_the_reference_path(clip, inputs, tmp_path, mode, decode, tol):
    model, preprocess = clip
    summary = _label(inputs, tmp_path / "s", resize_mode=mode, decode=decode)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    runtime = manifest["params"]["label_runtime"]
    assert runtime["decode"] == decode and manifest["params"]["label"]["resize_mode"] == mode
    assert summary["counts"]["samples"] == 8
    reference = _reference_labels(inputs, preprocess, model, mode, runtime["logit_scale"])
    for sid, sample in _samples(tmp_path / "s").items():
        q_rel, q_ents = reference[sid]
        _assert_top_k(sample["rel_idx"], sample["rel_prob"], q_rel, tol)
        assert sample["ent_idx"].shape[0] == len(q_ents)
        for idx, prob, q in zip(sample["ent_idx"], sample["ent_prob"], q_ents, strict=True):
            _assert_top_k(idx, prob, q, tol)
        assert max(decode_rgb(sample["jpg"]).size) <= 512


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_letterbox_lets_content_at_the_edge_reach_the_encoder(clip, tmp_path):
    """A wide image whose only content is a strip at its left edge: centre crop never shows
    the strip to CLIP (q_rel equals that of the plain image); letterbox does."""
    _, preprocess = clip
    paths = write_labeling_inputs(tmp_path / "in", n=3)
    plain = Image.new("RGB", (240, 80), (128, 128, 128))
    strip = plain.copy()
    strip.paste((220, 20, 20), (0, 0, 16, 80))
    strip.paste((20, 220, 20), (0, 0, 16, 10))  # the ends of a tall crop of the strip
    strip.paste((20, 20, 220), (0, 70, 16, 80))
    pairs = read_pairs(paths["pairs"])
    Path(pairs["image_path"][0]).write_bytes(_png(plain))
    Path(pairs["image_path"][1]).write_bytes(_png(strip))
    for mode in ("center_crop", "letterbox"):
        spec = ClipInputSpec.from_preprocess(preprocess, mode)
        image_same = square_pil(plain, spec).tobytes() == square_pil(strip, spec).tobytes()
        assert image_same == (mode == "center_crop")
        # A tall crop of the strip (16 x 80): its coloured ends survive only the letterbox.
        crop = np.asarray(square_pil(strip.crop((0, 0, 16, 80)), spec)).astype(int)
        has_ends = crop[..., 1].max() > 150 and crop[..., 2].max() > 150
        assert has_ends == (mode == "letterbox")
        # The same on the device path.
        t = torch.from_numpy(np.array(strip)).permute(2, 0, 1).contiguous()
        plain_t = torch.from_numpy(np.array(plain)).permute(2, 0, 1).contiguous()
        same_t = torch.equal(square_tensor(t, spec), square_tensor(plain_t, spec))
        assert same_t == (mode == "center_crop")

    paths["boxes"] = _write_boxes(paths["pairs"], tmp_path / "b.parquet", lambda i, w, h: [])
    paths["prompts"] = tmp_path / "prompts.safetensors"
    embed_prompts(paths["entities"], paths["relations"], paths["prompts"])
    for mode in ("center_crop", "letterbox"):
        _label(paths, tmp_path / mode, resize_mode=mode, k_rel=5)
        samples = _samples(tmp_path / mode)
        a, b = samples[pairs["id"][0]], samples[pairs["id"][1]]
        same = np.array_equal(a["rel_prob"], b["rel_prob"]) and np.array_equal(
            a["rel_idx"], b["rel_idx"]
        )
        assert same == (mode == "center_crop"), mode


def test_resize_mode_is_part_of_the_fingerprint(inputs, tmp_path):
    prints = set()
    for mode in ("letterbox", "center_crop"):
        job, _ = plan_labeling(_settings(inputs, tmp_path / mode, resize_mode=mode))
        prints.add(job.fingerprint)
    assert len(prints) == 2
    with pytest.raises(InputError, match="resize-mode"):
        LabelParams(resize_mode="stretch").check()


def test_logit_scale_comes_from_the_loaded_model(inputs, tmp_path):
    """A tiny CLIP saved with logit_scale = log(50), loaded through load_clip(path): the run
    records 50 (source: model) and its labels differ from the stock tiny CLIP's (1/0.07); an
    explicit value overrides the model's and is recorded as such."""
    model, _, _ = load_clip("tiny")
    model.logit_scale.data.fill_(math.log(50.0))
    ckpt = tmp_path / "clip50.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    prompts50 = tmp_path / "prompts50.safetensors"
    embed_prompts(inputs["entities"], inputs["relations"], prompts50, clip_path=ckpt)

    _label(inputs, tmp_path / "stock")
    _label(inputs, tmp_path / "s50", clip_path=ckpt, prompts=prompts50)
    _label(inputs, tmp_path / "param50", logit_scale=50.0)
    runtime = {
        name: json.loads((tmp_path / name / "manifest.json").read_text())["params"]["label_runtime"]
        for name in ("stock", "s50", "param50")
    }
    assert runtime["stock"]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)
    assert runtime["s50"]["logit_scale"] == pytest.approx(50.0, rel=1e-6)
    assert runtime["stock"]["logit_scale_source"] == runtime["s50"]["logit_scale_source"] == "model"
    assert runtime["param50"] == dict(runtime["s50"], logit_scale=50.0, logit_scale_source="param")
    stock, s50, param50 = (_samples(tmp_path / n) for n in ("stock", "s50", "param50"))
    assert any(not np.allclose(stock[k]["rel_prob"], s50[k]["rel_prob"], atol=1e-3) for k in stock)
    for k in stock:  # same weights but the scale: the model's 50 and an explicit 50 agree
        np.testing.assert_allclose(s50[k]["rel_prob"], param50[k]["rel_prob"], atol=1e-5)
