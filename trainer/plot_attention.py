"""Paper fig. 5, the case study: where an entity's tokens look in the image.

For world MNER test sentences whose entity type only the image settles, the attention of the
fusion layers from the entity's tokens to the visual tokens, averaged over heads, layers and
the entity's tokens and normalised to 0-1 (the largest visual weight is 1): ALBEF's image
patches (and crops, when it fuses them), HVP's 2 x 2 whole-image tokens and its object crops.
One column per model (fine-tuned MNER models, `trainer/finetune.py --save-model`: OUT/model),
each titled with the type it predicts. SDPA returns no weights, so the models are run with
eager attention here (ALBEF: HF's eager kernel; HVP: its explicit path). Usage:

    python trainer/plot_attention.py --world data/world --model "no pretraining=runs/a/model" \
        --model "w/o COE=runs/b/model" --model "full=runs/c/model" --out reports/attention.png
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python trainer/plot_attention.py` puts trainer/ first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmu.errors import InputError  # noqa: E402
from pmu.io import save_figure, write_json_atomic  # noqa: E402
from trainer.plot_fused import WorldItem, mner_items  # noqa: E402


@dataclass
class Attention:
    """One model on one sentence: visual attention (0-1) and the type it predicts."""

    grid: np.ndarray  # [g, g] over the whole image
    crops: list[float]  # one per fused crop box, same scale
    boxes: list[list[float]]  # the crops' boxes (normalised xyxy)
    predicted: str
    key_share: float  # of all visual attention, the share on the key object (cells + crop)


def _inputs(model, tokenizer, item: WorldItem, boxes: list[list[float]], device):
    import torch
    from PIL import Image

    from trainer.data import vit_pixels

    enc = tokenizer([item.words], is_split_into_words=True, truncation=True, max_length=64,
                    return_tensors="pt")  # fmt: skip
    words = enc.word_ids(0)
    entity = [t for t, w in enumerate(words) if w is not None and item.span[0] <= w < item.span[1]]
    first = [words.index(w) for w in sorted({w for w in words if w is not None})]
    pixels = torch.from_numpy(vit_pixels(Image.open(item.image), model.cfg.image_size))[None]
    box_t = torch.tensor([boxes], dtype=torch.float32) if boxes else None
    return (enc["input_ids"].to(device), enc["attention_mask"].to(device), pixels.to(device),
            None if box_t is None else box_t.to(device), entity, first)  # fmt: skip


def _albef_weights(model, ids, mask, pixels, boxes) -> tuple[Any, Any]:
    """(fused text states, attention [layers, heads, T+V, T+V]) with HF's eager kernel."""
    import torch

    captured: list = []
    layers = model.bert.encoder.layer[model.n_text_layers :]
    hooks = [
        layer.attention.self.register_forward_hook(lambda m, i, o: captured.append(o[1]))
        for layer in layers
    ]
    before = model.bert.config._attn_implementation
    model.bert.set_attn_implementation("eager")
    try:
        has = torch.ones(1, dtype=torch.bool, device=ids.device)
        states = model.text_states(ids, mask, pixels, has, boxes)
    finally:
        model.bert.set_attn_implementation(before)
        for h in hooks:
            h.remove()
    return states, torch.cat(captured)  # [L, heads, Q, K]


def visual_attention(model, ids, mask, pixels, boxes, entity: list[int]):
    """(fused text states, grid weights [g, g], crop weights) for the entity's tokens."""
    import torch

    t = ids.shape[1]
    if hasattr(model, "prefix"):  # HVP: keys are [prefix; text], every layer fuses
        weights: list = []
        has = torch.ones(1, dtype=torch.bool, device=ids.device)
        states = model.text_states(ids, mask, pixels, has, boxes, attentions=weights)
        att = torch.cat(weights).mean((0, 1))[entity].mean(0)  # [P + T]
        visual = att[: att.shape[0] - t]
        grid, crops = visual[:4].view(2, 2), visual[4:].view(-1, 4).sum(1)
    else:  # ALBEF: keys are [text; image CLS; patches; crop CLS]
        states, att = _albef_weights(model, ids, mask, pixels, boxes)
        att = att.mean((0, 1))[entity].mean(0)
        g = model.patch_grid()[0]
        grid, crops = att[t + 1 : t + 1 + g * g].view(g, g), att[t + 1 + g * g :]
    top = max(float(grid.max()), float(crops.max()) if crops.numel() else 0.0, 1e-12)
    return states, (grid / top).float().cpu().numpy(), (crops / top).float().cpu().tolist()


def load_finetuned(folder: str | Path, device):
    """(encoder, tokenizer, MNER head or None, labels) from `finetune.py --save-model`'s
    OUT/model (a pretraining checkpoint alone gives no head: no prediction)."""
    from safetensors.torch import load_file

    from trainer.factory import load_pretrained
    from trainer.heads import CRFTagger

    folder = Path(folder)
    model, _, tokenizer = load_pretrained(folder, device)
    head, labels = None, []
    if (folder / "head.safetensors").is_file():
        labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        head = CRFTagger(model.hidden_size, len(labels))
        head.load_state_dict(load_file(str(folder / "head.safetensors")))
        head = head.to(device).eval()
    return model.eval(), tokenizer, head, labels


def case(model, tokenizer, head, labels, item: WorldItem, boxes, device) -> Attention:
    """Attention and prediction of one model on one sentence."""
    import torch

    ids, mask, pixels, box_t, entity, first = _inputs(model, tokenizer, item, boxes, device)
    with torch.no_grad():
        states, grid, crops = visual_attention(model, ids, mask, pixels, box_t, entity)
        predicted = "?"
        if head is not None:
            index = torch.tensor([first], device=device)
            tags = head.decode(states, index, torch.ones_like(index))[0]
            tag = labels[tags[item.span[0]]] if item.span[0] < len(tags) else "O"
            predicted = tag.split("-", 1)[-1] if tag != "O" else "O"
    n = len(crops)
    return Attention(grid, crops, boxes[:n], predicted, key_share(grid, crops, item.box))


def key_share(grid: np.ndarray, crops: list[float], box: list[float]) -> float:
    """Share of the visual attention on the key object: the grid cells whose centre lies in
    its box, and its crop (the first)."""
    centres = (np.arange(grid.shape[0]) + 0.5) / grid.shape[0]
    x0, y0, x1, y1 = box
    inside = np.outer((centres >= y0) & (centres <= y1), (centres >= x0) & (centres <= x1))
    total = float(grid.sum()) + sum(crops)
    return (float(grid[inside].sum()) + (crops[0] if crops else 0.0)) / max(total, 1e-12)


def _crop_boxes(world: Path, item: WorldItem, n: int) -> list[list[float]]:
    """The image's true boxes, key object first (the detector's role at fine-tuning)."""
    rows = (json.loads(line) for line in (world / "mner" / "truth.jsonl").open(encoding="utf-8"))
    row = next(r for r in rows if Path(r["image"]).name == item.image.name)
    boxes = [[x0 / row["width"], y0 / row["height"], x1 / row["width"], y1 / row["height"]]
             for x0, y0, x1, y1 in row["boxes"]]  # fmt: skip
    rest = [b for b in boxes if b != item.box]
    return ([item.box] + rest)[:n]


def draw(cases: list[WorldItem], results: dict[str, list[Attention]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    cols = len(results) + 1
    fig = Figure(figsize=(3.0 * cols, 3.2 * len(cases) + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(len(cases), cols, squeeze=False)
    for r, item in enumerate(cases):
        img = np.asarray(Image.open(item.image).convert("RGB").resize((160, 160)))
        name = " ".join(item.words[item.span[0] : item.span[1]])
        text = textwrap.shorten(" ".join(item.words), 80, placeholder=" …")
        axes[r, 0].imshow(img)
        title = "\n".join(textwrap.wrap(text, 40)) + f"\n{name}: {item.label} (key object boxed)"
        axes[r, 0].set_title(title, fontsize=7)
        x0, y0, x1, y1 = (v * 160 for v in item.box)
        axes[r, 0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow"))
        for c, (model_name, atts) in enumerate(results.items(), start=1):
            a, ax = atts[r], axes[r, c]
            ax.imshow(img)
            heat = np.zeros((*a.grid.shape, 4))
            heat[..., 0], heat[..., 3] = 1.0, 0.7 * np.clip(a.grid, 0, 1)  # red, by weight
            ax.imshow(heat, extent=(0, 160, 160, 0), interpolation="bilinear")
            for w, (bx0, by0, bx1, by1) in zip(a.crops, a.boxes, strict=False):
                ax.add_patch(Rectangle((bx0 * 160, by0 * 160), (bx1 - bx0) * 160,
                                       (by1 - by0) * 160, fill=False, color="white",
                                       linewidth=0.5 + 3 * w))  # fmt: skip
                ax.text(bx0 * 160, by0 * 160, f"{w:.2f}", color="white", fontsize=6)
            mark = "✓" if a.predicted == item.label else "✗"
            ax.set_title(f"{model_name}: {a.predicted} {mark}\non the key object "
                         f"{a.key_share:.0%}", fontsize=8)  # fmt: skip
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("the entity tokens' attention to the image, fusion layers, 0-1\nred: the "
                 "image's tokens; white boxes: the crops (line width, number: their weight)",
                 fontsize=9)  # fmt: skip
    save_figure(fig, out)


def plot_attention(models: dict[str, str], world: str | Path, out: str | Path, n: int = 4,
                   crops: int = 3, device: str = "cpu") -> dict[str, Any]:  # fmt: skip
    """Draw the case study for fine-tuned MNER model folders (name -> folder)."""
    world = Path(world)
    items = _balanced(mner_items(world, 400), n)
    results: dict[str, list[Attention]] = {}
    for name, folder in models.items():
        model, tokenizer, head, labels = load_finetuned(folder, device)
        k = min(crops, model.cfg.max_crops)
        results[name] = [
            case(model, tokenizer, head, labels, it, _crop_boxes(world, it, k), device)
            for it in items
        ]
    draw(items, results, Path(out))
    share = {name: round(float(np.mean([a.key_share for a in atts])), 4)
             for name, atts in results.items()}  # fmt: skip
    right = {name: sum(a.predicted == it.label for a, it in zip(atts, items, strict=True))
             for name, atts in results.items()}  # fmt: skip
    return {"out": str(out), "sentences": len(items), "key_object_share": share, "right": right}


def _balanced(items: list[WorldItem], n: int) -> list[WorldItem]:
    """Up to `n` sentences, the entity types taking turns."""
    by_type: dict[str, list[WorldItem]] = {}
    for it in items:
        by_type.setdefault(it.label, []).append(it)
    out: list[WorldItem] = []
    while len(out) < n and any(by_type.values()):
        for label in sorted(by_type):
            if by_type[label] and len(out) < n:
                out.append(by_type[label].pop(0))
    if not out:
        raise InputError("no image-dependent MNER test sentence with its key object found")
    return out


def main(argv: list[str] | None = None) -> int:
    from trainer.settings import run_main

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", required=True, help="a synth-world folder")
    p.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                   help="a fine-tuned MNER model (OUT/model): a column (repeat)")  # fmt: skip
    p.add_argument("--n", type=int, default=4, help="sentences (rows)")
    p.add_argument("--crops", type=int, default=3,
                   help="true boxes given as crops, at most what the model fuses")  # fmt: skip
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--metrics", default=None, help="JSON: key-object share, right predictions")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    def go() -> dict[str, Any]:
        models = {}
        for spec in args.model:
            name, sep, folder = spec.partition("=")
            if not sep:
                raise InputError(f"--model {spec!r}: write NAME=FOLDER")
            models[name] = folder
        result = plot_attention(models, args.world, args.out, args.n, args.crops, args.device)
        if args.metrics:
            write_json_atomic(Path(args.metrics), result)
        print(json.dumps(result, indent=1))
        return result

    return run_main(go, debug=False)


if __name__ == "__main__":
    sys.exit(main())
