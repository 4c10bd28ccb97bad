"""Does a pretrained student's vision tower know which objects an image holds?

    python benchmarks/probe_student_vision.py --checkpoint /tmp/abl-0/pretrain/full \
        --world /tmp/abl-0/world [--task mner]
    python benchmarks/probe_student_vision.py --vit /tmp/abl-0/models/student-vit --world ...

Linear probes (one logistic regression per object class, on the ViT's [CLS] + mean patch
state) trained on the world's MNER (or MRE) train images and scored on its test images against
the world's truth: mean ROC AUC over the classes, for the checkpoint's ViT and for a fresh ViT of
the same shape (random init). A diagnostic for the synthetic ablation: fine-tuning can only use
the image for image-dependent entities if the vision tower separates the classes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def features(model, vit, paths: list[Path], size: int):
    import numpy as np
    import torch

    from trainer.finetune_data import load_pixels

    out = []
    with torch.no_grad():
        for i in range(0, len(paths), 32):
            px = torch.stack([load_pixels(p, size) for p in paths[i : i + 32]])
            h = vit(pixel_values=model.normalise(px)).last_hidden_state
            out.append(torch.cat([h[:, 0], h[:, 1:].mean(1)], -1).numpy())
    return np.concatenate(out)


def probe_auc(xtr, ytr, xte, yte) -> list[float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    aucs = []
    for j in range(ytr.shape[1]):
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(xtr, ytr[:, j])
        aucs.append(float(roc_auc_score(yte[:, j], clf.predict_proba(xte)[:, 1])))
    return aucs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a trainer save_pretrained folder")
    which.add_argument("--vit", help="an HF ViT folder (e.g. trainer/vision_init.py's output)")
    p.add_argument("--world", required=True, help="a synth-world folder")
    p.add_argument("--task", choices=("mner", "mre"), default="mner")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh ViT")
    args = p.parse_args()

    import numpy as np
    import torch
    from transformers import ViTModel

    from trainer.factory import load_pretrained

    torch.set_num_threads(1)
    folder = Path(args.world) / args.task
    rows = [json.loads(line) for line in (folder / "truth.jsonl").read_text().splitlines()]
    classes = sorted({c for r in rows for c in r["classes"]})
    split = {s: [r for r in rows if Path(r["image"]).name.startswith(s)] for s in ("train", "test")}
    labels = {
        s: np.array([[c in r["classes"] for c in classes] for r in rs], dtype=int)
        for s, rs in split.items()
    }
    if args.checkpoint:
        model, _, _ = load_pretrained(args.checkpoint)
    else:
        from trainer.factory import build_model
        from trainer.model import ModelConfig

        model = build_model(ModelConfig(preset="tiny", vision_encoder=args.vit))  # any BERT
    model.eval()
    size = model.vit.config.image_size
    torch.manual_seed(args.seed)
    fresh = ViTModel(model.vit.config, add_pooling_layer=False).eval()
    paths = {s: [folder / r["image"] for r in rs] for s, rs in split.items()}
    print(f"{len(paths['train'])} train / {len(paths['test'])} test images, {len(classes)} classes")
    given = "checkpoint" if args.checkpoint else "--vit"
    for name, vit in ((given, model.vit), ("fresh (random init)", fresh)):
        xtr, xte = (features(model, vit, paths[s], size) for s in ("train", "test"))
        aucs = probe_auc(xtr, labels["train"], xte, labels["test"])
        detail = " ".join(f"{c} {a:.2f}" for c, a in zip(classes, aucs, strict=True))
        print(f"{name:>20}: mean AUC {np.mean(aucs):.3f}  ({detail})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
