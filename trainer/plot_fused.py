"""Paper fig. 3 as the paper draws it: t-SNE of the *fused* states on the world's test data.

(a) the image-dependent entities of 50 MNER test sentences (the mean fused state of the
entity's tokens, the caption read with its image) against their objects (the fused state of
the image's key object, `FusionStates.objects` for its true box: person for PER, flag for LOC,
building for ORG, trophy for MISC); (b) 50 MRE test images whose relation only the image
settles (the fused [CLS] of the sentence with its image) against the relation prompts (the
fused [CLS] of "a photo of {relation}" read text-only). Beside each picture: how often the
nearest object is one of the entity's type, and the nearest prompt the image's relation.

Everything goes through the fusion interface, so any fusion draws. `trainer/plot_alignment.py`
stays: it plots the unimodal CIT embeddings on pretraining shards. Usage:

    python trainer/plot_fused.py --world data/world --model "no pretraining=small" \
        --model "full=checkpoints/pretrain" --out reports/fused.png [--metrics reports/fused.json]

A model is NAME=INIT: a pretraining checkpoint, a preset, or a local HF text encoder (then
`--fusion` and `--vision-encoder` say what is built around it, as for fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python trainer/plot_fused.py` puts trainer/ first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.prompts import RELATION_TEMPLATES  # noqa: E402
from pmu.errors import InputError  # noqa: E402
from pmu.io import save_figure, write_json_atomic  # noqa: E402
from trainer.plot_alignment import nearest_prompt_accuracy, tsne_2d  # noqa: E402

RELATION_TEMPLATE = RELATION_TEMPLATES[0]
TYPE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


@dataclass
class WorldItem:
    """One test sample: its words, the image, the key object's box (normalised) and label."""

    words: list[str]
    image: Path
    span: tuple[int, int]  # the entity's words (MNER); unused for MRE
    box: list[float]
    label: str


def _truth(world: Path, task: str) -> dict[str, dict]:
    rows = (json.loads(line) for line in (world / task / "truth.jsonl").open(encoding="utf-8"))
    return {Path(r["image"]).name: r for r in rows}


def _key_box(row: dict, cls: str) -> list[float] | None:
    """The first box of class `cls`, normalised xyxy."""
    for box, name in zip(row["boxes"], row["classes"], strict=True):
        if name == cls:
            x0, y0, x1, y1 = box
            w, h = row["width"], row["height"]
            return [x0 / w, y0 / h, x1 / w, y1 / h]
    return None


def mner_items(world: Path, n: int) -> list[WorldItem]:
    """The first `n` image-dependent entities of the MNER test split, with their key object."""
    from trainer.ie_data import read_ner

    meta = json.loads((world / "world.json").read_text(encoding="utf-8"))
    key_class = meta["mner_key_class"]
    truth = _truth(world, "mner")
    sentences = read_ner(world / "mner" / "test.txt")
    items = []
    for line in (world / "mner" / "test_image_dependent.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        sentence = sentences[row["index"]]
        image = f"{sentence.img_id}.jpg" if sentence.img_id else None
        for start, end, etype in row["spans"]:
            box = _key_box(truth[image], key_class[etype]) if image in truth else None
            if box is not None:
                path = world / "mner" / "images" / image
                items.append(WorldItem(sentence.tokens, path, (start, end), box, etype))
    return items[:n]


def mre_items(world: Path, n: int) -> list[WorldItem]:
    """The first `n` MRE test samples whose relation (not None) only the image settles."""
    from trainer.ie_data import load_rel2id, read_mnre

    samples = read_mnre(world / "mre" / "test.txt", load_rel2id(world / "mre" / "rel2id.json"))
    flags = [json.loads(line) for line in (world / "mre" / "test_image_dependent.jsonl").open()]
    items = []
    for flag in flags:
        s = samples[flag["index"]]
        if flag["image_dependent"] and s.relation != "None" and s.img_id:
            path = world / "mre" / "images" / s.img_id
            items.append(WorldItem(s.tokens, path, (0, 0), [0.0, 0.0, 1.0, 1.0], s.relation))
    return items[:n]


def _batch(model, tokenizer, items: list[WorldItem], device):
    """Token ids, mask, word ids per row, uint8 pixels and the key boxes [B, 1, 4]."""
    import torch
    from PIL import Image

    from trainer.data import vit_pixels

    enc = tokenizer([it.words for it in items], is_split_into_words=True, padding=True,
                    truncation=True, max_length=64, return_tensors="pt")  # fmt: skip
    words = [enc.word_ids(i) for i in range(len(items))]
    size = model.cfg.image_size
    pixels = np.stack([vit_pixels(Image.open(it.image), size) for it in items])
    boxes = torch.tensor([[it.box] for it in items], dtype=torch.float32)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    return ids, mask, words, torch.from_numpy(pixels).to(device), boxes.to(device)


def entity_points(model, tokenizer, items: list[WorldItem], device) -> tuple[Any, Any]:
    """(entity states [N, H]: mean fused state of the entity's tokens; object states [N, H])."""
    import torch

    ids, mask, words, pixels, boxes = _batch(model, tokenizer, items, device)
    has = torch.ones(len(items), dtype=torch.bool, device=device)
    with torch.no_grad():
        tokens = model.text_states(ids, mask, pixels, has)
        states, _ = model.states(ids, mask, pixels, boxes)
    if states.objects is None:
        raise InputError("the model gives no object states (it was built without COE's head)")
    ents = []
    for i, it in enumerate(items):
        pos = [t for t, w in enumerate(words[i]) if w is not None and it.span[0] <= w < it.span[1]]
        ents.append(tokens[i, pos].mean(0))
    return torch.stack(ents).float().cpu().numpy(), states.objects[:, 0].float().cpu().numpy()


def relation_points(model, tokenizer, items: list[WorldItem], prompts: list[str], device):
    """(image states [N, H]: fused [CLS] of sentence + image; prompt states [R, H], text-only)."""
    import torch

    ids, mask, _, pixels, _ = _batch(model, tokenizer, items, device)
    has = torch.ones(len(items), dtype=torch.bool, device=device)
    enc = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
    none = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    with torch.no_grad():
        images = model.text_states(ids, mask, pixels, has)[:, 0]
        text = model.text_states(enc["input_ids"], enc["attention_mask"], None, none)[:, 0]
    return images.float().cpu().numpy(), text.float().cpu().numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fused_points(model, tokenizer, world: Path, n: int, device) -> dict[str, Any]:
    """Both panels' points and their numbers for one model."""
    meta = json.loads((world / "world.json").read_text(encoding="utf-8"))
    ents, rels = mner_items(world, n), mre_items(world, n)
    if len(ents) < 4 or len(rels) < 4:
        raise InputError(
            f"{world}: too few image-dependent test samples ({len(ents)}, {len(rels)})"
        )
    types = sorted({it.label for it in ents})
    ent_x, obj_x = entity_points(model, tokenizer, ents, device)
    ent_y = [types.index(it.label) for it in ents]
    # nearest object (of all N) is one of the entity's type
    nearest = np.argmax(_unit(ent_x) @ _unit(obj_x).T, axis=1)
    acc_ent = float(np.mean(np.asarray(ent_y)[nearest] == np.asarray(ent_y)))
    by_label = {label: rel for rel, label in meta["mre_from_relation"].items()}
    labels = sorted({it.label for it in rels})
    prompts = [RELATION_TEMPLATE.format(relation=by_label.get(lb, lb)) for lb in labels]
    img_x, prompt_x = relation_points(model, tokenizer, rels, prompts, device)
    img_y = [labels.index(it.label) for it in rels]
    acc_rel = nearest_prompt_accuracy(_unit(img_x), img_y, _unit(prompt_x))
    return {
        "entity": (ent_x, obj_x, ent_y, types),
        "relation": (img_x, prompt_x, img_y, [by_label.get(lb, lb) for lb in labels]),
        "entity_nearest_object_acc": round(acc_ent, 4),
        "image_nearest_prompt_acc": round(acc_rel, 4),
        "chance_entity": round(max(np.bincount(ent_y)) / len(ent_y), 4),
        "chance_relation": round(1 / len(labels), 4),
        "n_entities": len(ents),
        "n_images": len(rels),
    }


def _scatter(ax, xy, n_first: int, ys: list[int], names: list[str], marks: tuple[str, str],
             title: str, prompts: bool) -> None:  # fmt: skip
    first, second = xy[:n_first], xy[n_first:]
    colours = [TYPE_COLOURS[y % len(TYPE_COLOURS)] for y in ys]
    ax.scatter(first[:, 0], first[:, 1], s=16, c=colours, alpha=0.8, linewidths=0)
    other = list(range(len(names))) if prompts else ys
    ax.scatter(second[:, 0], second[:, 1], s=42, marker="^", edgecolors="black", linewidths=0.4,
               c=[TYPE_COLOURS[y % len(TYPE_COLOURS)] for y in other])  # fmt: skip
    if prompts:
        for (x, y), name in zip(second, names, strict=True):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset pixels")
    handles = [ax.scatter([], [], c=TYPE_COLOURS[i % len(TYPE_COLOURS)], s=16, label=n)
               for i, n in enumerate(names)]  # fmt: skip
    ax.legend(handles=handles, fontsize=7, loc="best", title=f"● {marks[0]}  ▲ {marks[1]}",
              title_fontsize=7)  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def draw(points: dict[str, dict[str, Any]], out: Path, seed: int = 0) -> None:
    """One column per model: (a) entities vs objects, (b) images vs relation prompts."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8 * len(points), 8.4), dpi=100, layout="constrained")
    axes = fig.subplots(2, len(points), squeeze=False)
    for col, (name, p) in enumerate(points.items()):
        ent_x, obj_x, ent_y, types = p["entity"]
        xy = tsne_2d(_unit(np.concatenate([ent_x, obj_x])), seed)
        _scatter(axes[0, col], xy, len(ent_x), ent_y, types, ("entity", "its object"),
                 f"{name}\n(a) entities vs their objects\nnearest object of the entity's type: "
                 f"{p['entity_nearest_object_acc']:.0%} (majority {p['chance_entity']:.0%})",
                 prompts=False)  # fmt: skip
        img_x, prompt_x, img_y, rels = p["relation"]
        xy = tsne_2d(_unit(np.concatenate([img_x, prompt_x])), seed)
        _scatter(axes[1, col], xy, len(img_x), img_y, rels, ("image", "relation prompt"),
                 f"(b) images vs relation prompts\nnearest prompt is the image's relation: "
                 f"{p['image_nearest_prompt_acc']:.0%} (chance {p['chance_relation']:.0%})",
                 prompts=True)  # fmt: skip
    fig.suptitle("t-SNE of the fused states, world test samples whose label only the image "
                 "settles", fontsize=10)  # fmt: skip
    save_figure(fig, out)


def load_model(init: str, fusion: str, vision_encoder: str | None, preset: str, device):
    """(model, tokenizer) for a checkpoint, preset or HF text encoder, as fine-tuning loads."""
    from trainer.finetune_config import FinetuneConfig
    from trainer.finetune_model import load_encoder

    cfg = FinetuneConfig(task="mner", train="", dev="", test="", init=init, fusion=fusion,
                         vision_encoder=vision_encoder, preset=preset)  # fmt: skip
    model, tokenizer, _, _ = load_encoder(cfg)
    return model.to(device).eval(), tokenizer


def plot_fused(models: dict[str, tuple[Any, Any]], world: str | Path, out: str | Path,
               n: int = 50, seed: int = 0, device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Draw the figure for `models` (name -> (model, tokenizer)); returns the numbers."""
    import torch

    torch.manual_seed(seed)
    points = {
        name: fused_points(m, tok, Path(world), n, device) for name, (m, tok) in models.items()
    }
    draw(points, Path(out), seed)
    numbers = {name: {k: v for k, v in p.items() if k not in ("entity", "relation")}
               for name, p in points.items()}  # fmt: skip
    return {"out": str(out), "world": str(world), "seed": seed, "models": numbers}


def main(argv: list[str] | None = None) -> int:
    from trainer.settings import run_main

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", required=True, help="a synth-world folder (its mner/ and mre/)")
    p.add_argument("--model", action="append", required=True, metavar="NAME=INIT",
                   help="a column: checkpoint, preset or HF text encoder (repeat)")  # fmt: skip
    p.add_argument("--fusion", default="albef", help="for a preset / HF init: albef | hvp | ...")
    p.add_argument("--vision-encoder", default=None, help="for a preset / HF init")
    p.add_argument("--preset", default="small")
    p.add_argument("--n", type=int, default=50, help="test samples per panel")
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--metrics", default=None, help="JSON of the numbers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    def go() -> dict[str, Any]:
        models = {}
        for spec in args.model:
            name, sep, init = spec.partition("=")
            if not sep:
                raise InputError(f"--model {spec!r}: write NAME=INIT")
            models[name] = load_model(init, args.fusion, args.vision_encoder, args.preset,
                                      args.device)  # fmt: skip
        result = plot_fused(models, args.world, args.out, args.n, args.seed, args.device)
        if args.metrics:
            write_json_atomic(Path(args.metrics), result)
        print(json.dumps(result["models"], indent=1))
        return result

    return run_main(go, debug=False)


if __name__ == "__main__":
    sys.exit(main())
