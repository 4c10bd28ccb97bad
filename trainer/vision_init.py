"""Train the student's ViT (or the HVP fusion's CNN) on annotated boxes: a stand-in for its
ImageNet pretraining.

    python trainer/vision_init.py --annotations data/world/adapt/truth.jsonl --preset small \
        --out models/student-vit --steps 1500
    python trainer/vision_init.py --annotations data/world/adapt/truth.jsonl --preset small \
        --arch resnet10 --out models/student-cnn.safetensors       # for --fusion hvp

The paper's student starts from a pretrained ViT (ImageNet-21k). The `tiny` / `small` presets
have no such weights, and a ViT trained from scratch by the four pretraining losses alone learns
little about objects (docs/world.md). This supervised step gives it object-aware patches first,
the way `adapt-teacher` and `train-detector` stand in for CLIP's and YOLO's pretraining: for
every true box, the mean of the ViT's patch states under it (the patches COE pools, with the
same `box_patch_mask`) is classified by a linear head, and the image [CLS] predicts which classes
the image holds (multi-label). Both heads are dropped afterwards.

With `--arch` (a ResNet of trainer/hvp.py) the CNN the HVP fusion encodes images and crops
with is trained instead, the way that fusion uses it: each box's crop (`crop_boxes`) is
classified from the CNN's pooled features, and the whole image predicts its classes; the
output is a `.safetensors` file with its arch and input size, for `--vision-encoder`.

Input: a truth.jsonl (`image` relative to the file, `boxes` in pixels, `classes`), e.g. the
synthetic world's adapt split. Images are resized to the ViT's square input exactly as in
pretraining and fine-tuning (`trainer.data.vit_pixels`), then augmented (random crops of 60-100 %
of the side, horizontal flips): a ViT from scratch overfits a few thousand objects without. A seeded
10 % of the images is held out; the report gives the held-out object top-1 accuracy. The output
is a Hugging Face ViT folder (`config.json`, `model.safetensors`, `preprocessor_config.json`)
for `--vision-encoder` in pretraining and fine-tuning, and `OUT.json` (accuracy, losses, time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmu.errors import InputError  # noqa: E402
from pmu.io import atomic_dir  # noqa: E402
from trainer.settings import run_main  # noqa: E402


@dataclass
class VisionInitConfig:
    annotations: str
    out: str
    preset: str = "small"  # whose ViT architecture (random init) is trained
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    holdout: float = 0.1
    min_scale: float = 0.6  # augmentation: random crops of 60-100 % of the side, and flips
    seed: int = 0
    threads: int | None = None
    arch: str = ""  # "" the preset's ViT; a ResNet of trainer/hvp.py (resnet10, ...) for hvp


def load_examples(path: str | os.PathLike, size: int) -> tuple[Any, list[list], list[str]]:
    """uint8 pixels [N, 3, S, S], normalised xyxy boxes with class indices per image, classes."""
    import numpy as np

    from pipeline.images import decode_rgb, read_image_bytes
    from pmu.truth import read_truth
    from trainer.data import vit_pixels

    rows = read_truth(path)
    classes = sorted({c for r in rows for c in r["classes"]})
    index = {c: i for i, c in enumerate(classes)}
    pixels, objects = [], []
    for r in rows:
        img = decode_rgb(read_image_bytes(r["image"]))
        w, h = img.size
        pixels.append(vit_pixels(img, size))
        objects.append(
            [
                (b[0] / w, b[1] / h, b[2] / w, b[3] / h, index[c])
                for b, c in zip(r["boxes"], r["classes"], strict=True)
            ]
        )
    return np.stack(pixels), objects, classes


def collate(pixels, objects, idx, n_classes: int, rng=None, min_scale: float = 0.6):
    """Batch tensors: pixels, boxes [B, O, 4], classes [B, O] (-1 = padding), present [B, C].

    With `rng` each image is augmented: a random crop of `min_scale`-1 of its side (resized back)
    and a horizontal flip half the time; a box that keeps less than half its area in the crop is
    dropped (-1). Without `rng` the images are as given (evaluation)."""
    import torch
    import torch.nn.functional as F

    n_obj = max(1, max(len(objects[i]) for i in idx))
    px = torch.from_numpy(pixels[idx].copy())
    size = px.shape[-1]
    boxes = torch.zeros(len(idx), n_obj, 4)
    cls = torch.full((len(idx), n_obj), -1, dtype=torch.long)
    present = torch.zeros(len(idx), n_classes)
    for row, i in enumerate(idx):
        s, ox, oy, flip = 1.0, 0.0, 0.0, False
        if rng is not None:
            s = float(rng.uniform(min_scale, 1.0))
            ox, oy = float(rng.uniform(0, 1 - s)), float(rng.uniform(0, 1 - s))
            flip = bool(rng.random() < 0.5)
            side = max(1, round(s * size))
            left, top = round(ox * size), round(oy * size)
            crop = px[row, :, top : top + side, left : left + side].float()[None]
            img = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
            px[row] = img[0].round().clamp(0, 255).to(torch.uint8)
            if flip:
                px[row] = px[row].flip(-1)
        for k, (x0, y0, x1, y1, c) in enumerate(objects[i]):
            b = torch.tensor([(x0 - ox) / s, (y0 - oy) / s, (x1 - ox) / s, (y1 - oy) / s])
            kept = b.clamp(0, 1)
            area = (b[2] - b[0]) * (b[3] - b[1])
            if (kept[2] - kept[0]) * (kept[3] - kept[1]) < 0.5 * area:
                continue
            boxes[row, k] = (
                torch.stack([1 - kept[2], kept[1], 1 - kept[0], kept[3]]) if flip else kept
            )
            cls[row, k] = c
            present[row, c] = 1.0
    return px, boxes, cls, present


def _normalised(px):
    """uint8 pixels -> the student's normalised float input (its default mean and std)."""
    import torch

    from trainer.model import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD

    mean = torch.tensor(DEFAULT_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEFAULT_IMAGE_STD).view(1, 3, 1, 1)
    return (px.float() / 255.0 - mean) / std


def forward(encoder, obj_head, img_head, px, boxes, grid, min_cover: float = 0.5):
    """Object logits [B, O, C] and image logits [B, C]. A ViT: the mean patch state under each
    box, and [CLS]; a CNN (`grid` None): each box's crop, and the whole image, pooled."""
    x = _normalised(px)
    if grid is None:
        from trainer.fusion import crop_boxes

        b, o = boxes.shape[:2]
        crops = crop_boxes(x, boxes, max(32, x.shape[-1] // 2)).flatten(0, 1)
        return obj_head(encoder(crops).unflatten(0, (b, o))), img_head(encoder(x))
    from trainer.losses import box_patch_mask, pool_patches

    states = encoder(pixel_values=x).last_hidden_state
    pooled = pool_patches(states[:, 1:], box_patch_mask(boxes, grid, min_cover))
    return obj_head(pooled), img_head(states[:, 0])


def accuracy(vit, obj_head, img_head, pixels, objects, idx, grid, n_classes: int) -> float:
    import torch

    right = total = 0
    with torch.no_grad():
        for s in range(0, len(idx), 128):
            chunk = idx[s : s + 128]
            px, boxes, cls, _ = collate(pixels, objects, chunk, n_classes)
            logits, _ = forward(vit, obj_head, img_head, px, boxes, grid)
            valid = cls >= 0
            right += int((logits.argmax(-1)[valid] == cls[valid]).sum())
            total += int(valid.sum())
    return right / max(1, total)


def _encoder(cfg: VisionInitConfig) -> tuple[Any, int, tuple[int, int] | None, int]:
    """(the encoder to train, its input size, its patch grid (None: a CNN), its width)."""
    from pipeline import models

    if cfg.arch:
        from trainer.hvp import PRESET_CNN, build_cnn

        cnn = build_cnn(cfg.arch).train()
        return cnn, PRESET_CNN[cfg.preset][1], None, int(cnn.layer4[-1].conv2.out_channels)
    vit = models.load_vision_encoder(cfg.preset).train()
    size, patch = int(vit.config.image_size), int(vit.config.patch_size)
    return vit, size, (size // patch, size // patch), int(vit.config.hidden_size)


def _check(cfg: VisionInitConfig) -> None:
    from pipeline import models

    if cfg.preset not in models.RANDOM_VIT:
        raise InputError(
            f"--preset {cfg.preset!r}: only the random-init presets "
            f"({', '.join(models.RANDOM_VIT)}) need this step; base loads a pretrained ViT"
        )
    if not Path(cfg.annotations).is_file():
        raise InputError(f"--annotations {cfg.annotations}: no such file (a truth.jsonl)")


def train_vision(cfg: VisionInitConfig) -> dict[str, Any]:
    """Train, save the ViT folder atomically; returns the report (also written to OUT.json)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipeline import models
    from pmu.io import write_json_atomic
    from pmu.optim import build_optimizer, build_scheduler
    from pmu.runtime import set_threads

    _check(cfg)
    set_threads(cfg.threads)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    vit, size, grid, hidden = _encoder(cfg)
    pixels, objects, classes = load_examples(cfg.annotations, size)
    n, n_classes = len(objects), len(classes)
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_held = int(round(n * cfg.holdout))
    held, train_idx = order[:n_held], order[n_held:]
    print(f"vision-init: {len(train_idx)} train / {n_held} held-out images, {n_classes} classes")

    with models.seeded(cfg.seed):
        obj_head, img_head = torch.nn.Linear(hidden, n_classes), torch.nn.Linear(hidden, n_classes)
    heads = torch.nn.ModuleList([obj_head, img_head])
    optimizer = build_optimizer([(vit, cfg.lr), (heads, cfg.lr)], cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps)
    rng = np.random.default_rng(cfg.seed + 1)
    history = []
    for step in range(1, cfg.steps + 1):
        idx = rng.choice(train_idx, size=min(cfg.batch_size, len(train_idx)), replace=False)
        px, boxes, cls, present = collate(pixels, objects, idx, n_classes, rng, cfg.min_scale)
        obj_logits, img_logits = forward(vit, obj_head, img_head, px, boxes, grid)
        obj_loss = F.cross_entropy(obj_logits.flatten(0, 1), cls.flatten(), ignore_index=-1)
        img_loss = F.binary_cross_entropy_with_logits(img_logits, present)
        optimizer.zero_grad(set_to_none=True)
        (obj_loss + img_loss).backward()
        torch.nn.utils.clip_grad_norm_(list(vit.parameters()) + list(heads.parameters()), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == cfg.steps:
            history.append({"step": step, "object": obj_loss.item(), "image": img_loss.item()})
            print(
                f"vision-init: step {step}/{cfg.steps} object loss {history[-1]['object']:.3f} "
                f"image loss {history[-1]['image']:.3f}",
                flush=True,
            )
    vit.eval()
    report = {
        "annotations": str(cfg.annotations),
        "config": asdict(cfg),
        "classes": classes,
        "images": {"train": len(train_idx), "held_out": n_held},
        "held_out_object_top1": round(
            accuracy(vit, obj_head, img_head, pixels, objects, held, grid, n_classes), 4
        ),
        "history": history,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if cfg.arch:
        save_cnn(vit, Path(cfg.out), cfg.arch, size)
    else:
        save_vit(vit, Path(cfg.out))
    write_json_atomic(Path(f"{cfg.out}.json"), report)
    print(
        f"vision-init: held-out object top-1 {report['held_out_object_top1']:.3f}; "
        f"{cfg.out} ({report['wall_s']:.0f} s)"
    )
    return report


def save_vit(vit, out: Path) -> None:
    """HF folder with the normalisation the model was trained with, written via a temp dir."""
    from trainer.model import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD

    processor = {"image_mean": list(DEFAULT_IMAGE_MEAN), "image_std": list(DEFAULT_IMAGE_STD)}
    with atomic_dir(out) as tmp:
        vit.save_pretrained(str(tmp))
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def save_cnn(cnn, out: Path, arch: str, size: int) -> None:
    """The CNN's weights as .safetensors with its arch and input size (what `--vision-encoder`
    of the HVP fusion reads)."""
    from pmu.io import save_safetensors

    meta = {"format": "pmu-cnn-1", "arch": arch, "image_size": str(size)}
    save_safetensors(cnn.state_dict(), out, meta)


def main(argv: list[str] | None = None) -> int:
    d = VisionInitConfig(annotations="", out="")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--annotations", required=True, help="truth.jsonl: image, boxes, classes")
    p.add_argument(
        "--out", required=True, help="an HF ViT folder, or with --arch a .safetensors file"
    )
    p.add_argument("--preset", default=d.preset, help="random-init ViT architecture: tiny|small")
    for name in ("steps", "batch_size", "warmup_steps", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "holdout", "min_scale"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--arch", default=d.arch, help="a ResNet (resnet10, ...) for --fusion hvp")
    args = p.parse_args(argv)
    return run_main(lambda: train_vision(VisionInitConfig(**vars(args))), debug=False)


if __name__ == "__main__":
    sys.exit(main())
