"""Paper fig. 3: t-SNE of object crops vs entity prompts and images vs relation prompts.

Everything goes through the pretrained student's unimodal embedding heads (`image_embedding`,
`text_embedding`: L2-normalised projected [CLS]), so the plot shows whether pretraining put an
object near the prompt of the entity CLIP labelled it with. Usage:

    python trainer/plot_alignment.py --checkpoint checkpoints/pretrain --shards shards \
        --out reports/alignment.png [--metrics reports/alignment.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python trainer/plot_alignment.py` puts trainer/ first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.prompts import ENTITY_TEMPLATES, RELATION_TEMPLATES  # noqa: E402
from pipeline.report.collect import Reservoir  # noqa: E402
from pipeline.report.images import decode_image, pixel_box  # noqa: E402
from pmu import shards  # noqa: E402
from pmu.errors import InputError
from pmu.io import save_figure, write_json_atomic

ENTITY_TEMPLATE = ENTITY_TEMPLATES[0]
RELATION_TEMPLATE = RELATION_TEMPLATES[0]
MIN_POINTS = 4  # below this t-SNE (perplexity >= 1) has nothing to embed
MODALITY_COLOURS = {"image": "#1f77b4", "text": "#ff7f0e"}


def sample_images(shard_dir: str | os.PathLike, n_images: int, seed: int) -> list[dict[str, Any]]:
    """A seeded reservoir sample of decoded shard samples (unreadable shards are skipped)."""
    reservoir = Reservoir(n_images, seed)
    paths = shards.shard_paths(shard_dir)
    if not paths:
        raise InputError(f"no {shards.SHARD_GLOB} in {shard_dir}")
    for path in paths:
        try:
            for raw in shards.iter_raw_samples(path):
                reservoir.offer(raw)
        except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
            print(f"plot_alignment: skipping {path.name}: {exc}", file=sys.stderr)
    return [shards.decode_sample(raw) for _, raw in reservoir.items()]


def pixel_values(images: list, size: int):
    """PIL RGB images -> [B, 3, size, size] float tensor, normalised like the ViT processor."""
    import torch

    from trainer.data import vit_pixels

    return torch.from_numpy(np.stack([vit_pixels(img, size) for img in images]))


def embed_images(model, images: list, batch_size: int, device) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pv = pixel_values(images[i : i + batch_size], model.cfg.image_size).to(device)
            out.append(model.image_embedding(pv).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.proj_dim), np.float32)


def embed_texts(model, tokenizer, texts: list[str], batch_size: int, device) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=64,
                return_tensors="pt",
            )  # fmt: skip
            emb = model.text_embedding(
                enc["input_ids"].to(device), enc["attention_mask"].to(device)
            )
            out.append(emb.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.proj_dim), np.float32)


def nearest_prompt_accuracy(points: np.ndarray, labels: list[int], prompts: np.ndarray) -> float:
    """Share of points whose most cosine-similar prompt is their own top-1 pseudo-label."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.argmax(points @ prompts.T, axis=1) == np.asarray(labels)))


def tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE of L2-normalised rows; perplexity shrinks for small point sets."""
    from sklearn.manifold import TSNE

    n = x.shape[0]
    if n < MIN_POINTS:
        raise InputError(f"t-SNE needs at least {MIN_POINTS} points, got {n}: use more --images")
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine",
        max_iter=1000,
    )  # fmt: skip
    return tsne.fit_transform(x.astype(np.float64))


def _panel(ax, xy: np.ndarray | None, n_image: int, names: list[str], n_annotate: int,
           title: str, image_label: str, text_label: str) -> None:  # fmt: skip
    """Scatter one modality pair; prompt labels are placed later by `spread_labels`."""
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if xy is None:
        note = f"too few points for t-SNE ({n_image} {image_label}, {len(names)} prompts)"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=9)
        return
    img, txt = xy[:n_image], xy[n_image:]
    ax.scatter(img[:, 0], img[:, 1], s=14, c=MODALITY_COLOURS["image"], alpha=0.7,
               label=image_label, linewidths=0)  # fmt: skip
    ax.scatter(txt[:, 0], txt[:, 1], s=40, c=MODALITY_COLOURS["text"], marker="^",
               label=text_label, edgecolors="black", linewidths=0.4)  # fmt: skip
    for (x, y), name in list(zip(txt, names, strict=True))[:n_annotate]:
        label = ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset pixels",
                            ha="left", va="bottom", gid="prompt-label")  # fmt: skip
        label.set_in_layout(False)  # labels must not move the axes they are placed in
    ax.legend(fontsize=8, loc="best")


Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels (y up)
LABEL_RADII = (3, 10, 18, 28, 40, 55, 75)  # pixels from the point, tried in this order
LABEL_DIRECTIONS = ((1, 1), (-1, 1), (1, -1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0))


def _overlaps(a: Rect, b: Rect, pad: float = 1.0) -> bool:
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad


def label_spots(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                bounds: Rect) -> list[Rect]:  # fmt: skip
    """A rectangle per label near its anchor point, greedily in order, so that no label overlaps
    an earlier one and all stay inside `bounds`: the nearest free spot of a ring of candidate
    positions (8 directions at growing distances). Deterministic."""
    placed: list[Rect] = []
    for (ax_, ay), (w, h) in zip(anchors, sizes, strict=True):
        candidates = []
        for r in LABEL_RADII:
            for ux, uy in LABEL_DIRECTIONS:
                x = ax_ + r if ux > 0 else ax_ - r - w if ux < 0 else ax_ - w / 2
                y = ay + r if uy > 0 else ay - r - h if uy < 0 else ay - h / 2
                candidates.append((x, y, x + w, y + h))
        inside = [c for c in candidates if bounds[0] <= c[0] and c[2] <= bounds[2]
                  and bounds[1] <= c[1] and c[3] <= bounds[3]]  # fmt: skip
        free = [c for c in inside if not any(_overlaps(c, p) for p in placed)]
        placed.append((free or inside or candidates)[0])
    return placed


def spread_labels(fig) -> None:
    """Move every prompt label of `fig` to a free spot near its point (after layout)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    if not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)  # measuring text needs a renderer; Agg is what savefig uses
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_gid() == "prompt-label"]
        if not labels:
            continue
        anchors = [tuple(ax.transData.transform(t.xy)) for t in labels]
        extents = [Text.get_window_extent(t, renderer) for t in labels]  # text, no line
        sizes = [(e.width, e.height) for e in extents]
        box = ax.get_window_extent(renderer)
        spots = label_spots(anchors, sizes, (box.x0, box.y0, box.x1, box.y1))
        for label, (x, y), spot in zip(labels, anchors, spots, strict=True):
            dx, dy = spot[0] - x, spot[1] - y
            far = max(abs(dx), abs(dy)) > 12  # a leader line says which point it names
            label.remove()
            moved = ax.annotate(
                label.get_text(), label.xy, xytext=(dx, dy), textcoords="offset pixels",
                ha="left", va="bottom", fontsize=label.get_fontsize(), gid="prompt-label",
                arrowprops=dict(arrowstyle="-", lw=0.4, color="0.35", shrinkA=0, shrinkB=2)
                if far else None,
            )  # fmt: skip
            moved.set_in_layout(False)


def plot_alignment(
    checkpoint: str | os.PathLike,
    shard_dir: str | os.PathLike,
    out: str | os.PathLike,
    n_images: int = 64,
    max_objects: int = 256,
    max_entities: int = 40,
    max_relations: int = 40,
    n_annotate: int = 12,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    entity_template: str = ENTITY_TEMPLATE,
    relation_template: str = RELATION_TEMPLATE,
) -> dict[str, Any]:
    """Embed, reduce with t-SNE and plot both modality pairs into one PNG; return the numbers.

    Entities (relations) shown are the most frequent top-1 pseudo-labels of the sampled objects
    (images); objects whose top-1 entity is not among them are left out.
    """
    import torch

    from pmu.runtime import select_device
    from trainer.factory import build_tokenizer, load_pretrained

    dev = select_device(device)
    model, cfg, tokenizer = load_pretrained(checkpoint, device=dev)
    model.eval()
    tokenizer = tokenizer or build_tokenizer(cfg)
    if model.image_proj is None:
        raise InputError(f"{checkpoint}: the model has no embedding heads (proj_dim=0)")
    entity_names, relation_names = shards.read_vocabularies(shard_dir)
    crops, crop_top1, images, image_top1, skipped = crops_and_images(
        sample_images(shard_dir, n_images, seed)
    )
    ent_show = [e for e, _ in Counter(crop_top1).most_common(max_entities)]
    keep = [i for i, e in enumerate(crop_top1) if e in set(ent_show)][:max_objects]
    crops, crop_top1 = [crops[i] for i in keep], [crop_top1[i] for i in keep]
    rel_show = [r for r, _ in Counter(t for t in image_top1 if t >= 0).most_common(max_relations)]

    torch.manual_seed(seed)
    obj_emb = embed_images(model, crops, batch_size, dev)
    ent_emb = embed_texts(model, tokenizer, [entity_template.format(entity=entity_names[e])
                                             for e in ent_show], batch_size, dev)  # fmt: skip
    img_emb = embed_images(model, images, batch_size, dev)
    rel_emb = embed_texts(model, tokenizer, [relation_template.format(relation=relation_names[r])
                                             for r in rel_show], batch_size, dev)  # fmt: skip

    ent_pos = {e: i for i, e in enumerate(ent_show)}
    rel_pos = {r: i for i, r in enumerate(rel_show)}
    img_keep = [i for i, r in enumerate(image_top1) if r in rel_pos]
    acc_ent = nearest_prompt_accuracy(obj_emb, [ent_pos[e] for e in crop_top1], ent_emb)
    acc_rel = nearest_prompt_accuracy(
        img_emb[img_keep], [rel_pos[image_top1[i]] for i in img_keep], rel_emb
    )
    xy_ent, xy_rel = tsne_pair(
        np.concatenate([obj_emb, ent_emb]), np.concatenate([img_emb, rel_emb]), seed
    )
    names = ([entity_names[e] for e in ent_show], [relation_names[r] for r in rel_show])
    _draw(
        out, checkpoint, (xy_ent, xy_rel), (len(crops), len(images)), names, (acc_ent, acc_rel),
        n_annotate,
    )  # fmt: skip
    chance_ent, chance_rel = 1 / max(len(ent_show), 1), 1 / max(len(rel_show), 1)
    return {
        "out": str(out),
        "images": len(images),
        "objects": len(crops),
        "entities": len(ent_show),
        "relations": len(rel_show),
        "skipped_images": skipped,
        "nearest_prompt_acc_entity": _rounded(acc_ent),
        "nearest_prompt_acc_relation": _rounded(acc_rel),
        "chance_entity": round(chance_ent, 4),
        "chance_relation": round(chance_rel, 4),
        "seed": seed,
    }


def tsne_pair(x_ent: np.ndarray, x_rel: np.ndarray, seed: int) -> tuple[Any, Any]:
    """Both panels' 2-D points; a panel with too few points gets None (and says so), both
    empty is an error (nothing to plot)."""
    if max(len(x_ent), len(x_rel)) < MIN_POINTS:
        raise InputError(
            f"t-SNE needs at least {MIN_POINTS} points, got {len(x_ent)} (objects + entities) and "
            f"{len(x_rel)} (images + relations): use more --images"
        )
    xy_ent = tsne_2d(x_ent, seed) if len(x_ent) >= MIN_POINTS else None
    xy_rel = tsne_2d(x_rel, seed) if len(x_rel) >= MIN_POINTS else None
    return xy_ent, xy_rel


def crops_and_images(samples: list[dict[str, Any]]) -> tuple[list, list, list, list, int]:
    """(object crops, their top-1 entity, images, their top-1 relation, undecodable images)."""
    crops, crop_top1, images, image_top1, skipped = [], [], [], [], 0
    for s in samples:
        try:
            img = decode_image(s["jpg"])
        except ValueError:
            skipped += 1
            continue
        images.append(img)
        image_top1.append(int(s["rel_idx"][0]) if len(s["rel_idx"]) else -1)
        ent_idx = np.atleast_2d(s["ent_idx"])
        for o, box in enumerate(s["meta"].get("boxes", [])[: ent_idx.shape[0]]):
            if ent_idx.shape[1]:
                crops.append(img.crop(pixel_box(box, img.width, img.height)))
                crop_top1.append(int(ent_idx[o, 0]))
    return crops, crop_top1, images, image_top1, skipped


def _draw(out, checkpoint, xy, n_points, names, accuracy, n_annotate: int) -> None:
    """The two t-SNE panels (crops vs entity prompts, images vs relation prompts) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    (xy_ent, xy_rel), (n_crops, n_images), (ent_names, rel_names) = xy, n_points, names
    acc_ent, acc_rel = accuracy
    fig = Figure(figsize=(12, 5.6), dpi=100, layout="constrained")
    ax_ent, ax_rel = fig.subplots(1, 2)
    chance_ent = 1 / max(len(ent_names), 1)
    chance_rel = 1 / max(len(rel_names), 1)
    _panel(ax_ent, xy_ent, n_crops, ent_names, n_annotate,
           f"(a) {n_crops} object crops vs {len(ent_names)} entity prompts\n"
           f"nearest prompt = top-1 pseudo-label: {acc_ent:.1%} (chance {chance_ent:.1%})",
           "object crops (image)", "entity prompts (text)")  # fmt: skip
    _panel(ax_rel, xy_rel, n_images, rel_names, n_annotate,
           f"(b) {n_images} images vs {len(rel_names)} relation prompts\n"
           f"nearest prompt = top-1 pseudo-label: {acc_rel:.1%} (chance {chance_rel:.1%})",
           "images (image)", "relation prompts (text)")  # fmt: skip
    fig.suptitle(f"t-SNE of the student's unimodal embeddings ({Path(checkpoint).name})")
    spread_labels(fig)
    save_figure(fig, Path(out))


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(value, 4)  # JSON has no NaN


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pmu.runtime import configure_process

    configure_process()  # PMU_REPRODUCIBLE=1: pin the CPU kernels before torch computes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained folder")
    parser.add_argument("--shards", required=True, help="shard folder with vocabularies")
    parser.add_argument("--out", default="reports/alignment.png")
    parser.add_argument("--metrics", default=None, help="also write the numbers as JSON here")
    parser.add_argument("--images", type=int, default=64, help="images sampled (reservoir)")
    parser.add_argument("--max-objects", type=int, default=256)
    parser.add_argument("--max-entities", type=int, default=40)
    parser.add_argument("--max-relations", type=int, default=40)
    parser.add_argument("--annotate", type=int, default=12, help="prompt names written on plot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)

    from pmu.runtime import set_threads

    set_threads(args.threads or None)
    summary = plot_alignment(
        args.checkpoint, args.shards, args.out, n_images=args.images,
        max_objects=args.max_objects, max_entities=args.max_entities,
        max_relations=args.max_relations, n_annotate=args.annotate, seed=args.seed,
        batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    if args.metrics:
        write_json_atomic(args.metrics, summary)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    from trainer.settings import run_main

    sys.exit(run_main(main, debug="--debug" in sys.argv))
