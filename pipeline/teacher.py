"""adapt-teacher: contrastive fine-tuning of the open_clip teacher (the paper's "prompter").

Before labeling, the official code trains its prompter on the corpus. Here the open_clip model of
a preset (or a local checkpoint) is trained with up to three InfoNCE objectives:
- captions: symmetric InfoNCE between images and their captions (matched prepared pairs);
- entities: object crops against the entity prompts of every candidate class (where the source
  gives boxes with class names, e.g. the synthetic world's truth.jsonl);
- relations: whole images against the relation prompts of every candidate relation (where the
  source gives an image relation).
The prompts use the same templates as embed-prompts, and images the same square preprocessing
as label-objects (letterbox by default), so the adapted model is trained for exactly the
similarities labeling computes. The result is an open_clip state dict (.safetensors) usable as
`models.clip` / `--clip`.

Every batch is a function of (seed, step): a resumed run (`--resume`, state in `{out}.state/`)
continues with the same batches and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.settings import AdaptTeacherSettings, TeacherParams
from pmu.errors import InputError
from pmu.io import atomic_path, save_figure
from pmu.truth import read_truth


@dataclass
class TeacherData:
    """What the objectives draw from (image paths, with their texts / boxes / relations)."""

    captions: list[tuple[str, str]] = field(default_factory=list)  # (image, caption)
    crops: list[tuple[str, list[float], int]] = field(default_factory=list)  # (image, box, class)
    relations: list[tuple[str, int]] = field(default_factory=list)  # (image, relation)
    scenes: list[tuple[str, list[int]]] = field(default_factory=list)  # (image, classes in it)
    classes: list[str] = field(default_factory=list)
    relation_labels: list[str] = field(default_factory=list)
    extra_entities: list[str] = field(default_factory=list)  # vocabulary negatives
    extra_relations: list[str] = field(default_factory=list)
    held_crops: list[tuple[str, list[float], int]] = field(default_factory=list)
    held_relations: list[tuple[str, int]] = field(default_factory=list)
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)  # annotated image -> boxes


def collect_data(
    pairs_path: str | os.PathLike | None,
    annotations_path: str | os.PathLike | None,
    holdout: float,
    seed: int,
    entities_path: str | os.PathLike | None = None,
    relations_path: str | os.PathLike | None = None,
) -> TeacherData:
    """The three objectives' items; a seeded `holdout` share of annotated images is kept apart.

    The entity / relation vocabularies (entities.json, relations.json), when given, add their
    other entries as negatives: labeling ranks a crop against every vocabulary prompt, so the
    adapted model must prefer the true class over synonyms and unrelated nouns too."""
    from pipeline.prompts import read_entity_names, read_relation_labels

    data = TeacherData()
    held_images: set[str] = set()  # realpaths: a held-out image trains no objective
    annotated_captions: list[tuple[str, str]] = []
    if annotations_path:
        rows = read_truth(annotations_path)
        data.classes = sorted({c for r in rows for c in r["classes"]})
        data.relation_labels = sorted({r["relation"] for r in rows if r.get("relation")})
        cls = {c: i for i, c in enumerate(data.classes)}
        rel = {r: i for i, r in enumerate(data.relation_labels)}
        held = set(
            np.random.default_rng([seed, 7]).permutation(len(rows))[: int(holdout * len(rows))]
        )
        for i, r in enumerate(rows):
            crops = [
                (r["image"], [float(v) for v in b], cls[c])
                for b, c in zip(r["boxes"], r["classes"], strict=True)
            ]
            rels = [(r["image"], rel[r["relation"]])] if r.get("relation") else []
            if i in held:
                held_images.add(os.path.realpath(r["image"]))
                data.held_crops += crops
                data.held_relations += rels
            else:
                data.crops += crops
                data.relations += rels
                data.boxes[r["image"]] = [box for _, box, _ in crops]
                if crops:
                    data.scenes.append((r["image"], sorted({c for *_, c in crops})))
                if r.get("caption"):
                    annotated_captions.append((r["image"], r["caption"]))
    if pairs_path:
        import pyarrow.parquet as pq

        table = pq.read_table(pairs_path, columns=["image_path", "caption", "itm"])
        for image, caption, itm in zip(
            *(table.column(c).to_pylist() for c in table.column_names), strict=True
        ):
            # the held-out images' captions would train their features: they stay out too
            if itm == 1 and os.path.realpath(image) not in held_images:
                data.captions.append((image, caption))
    data.captions += annotated_captions
    if entities_path:
        data.extra_entities = [e for e in read_entity_names(entities_path) if e not in data.classes]
    if relations_path:
        known = set(data.relation_labels)
        data.extra_relations = [r for r in read_relation_labels(relations_path) if r not in known]
    return data


# ----------------------------------------------------------------------------- images


def _load_rgb(path: str):
    from pipeline.images import decode_rgb, read_image_bytes

    return decode_rgb(read_image_bytes(path))


def _mirror(img: Any) -> Any:
    from PIL import Image

    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def window_keeping_boxes(
    size: tuple[int, int], boxes: Sequence[Sequence[float]], margin: float, u: Sequence[float]
) -> tuple[int, int, int, int]:
    """A window (left, top, right, bottom) of an image of `size` that holds every box: up to
    `margin` of the space between the boxes' union and each image edge is cut, by the four
    uniform draws `u` in [0, 1). No boxes: the whole image."""
    width, height = size
    if not boxes:
        return 0, 0, width, height
    ux0 = max(0.0, min(b[0] for b in boxes))
    uy0 = max(0.0, min(b[1] for b in boxes))
    ux1 = min(float(width), max(b[2] for b in boxes))
    uy1 = min(float(height), max(b[3] for b in boxes))
    left = int(math.floor(u[0] * margin * ux0))
    top = int(math.floor(u[1] * margin * uy0))
    right = int(math.ceil(width - u[2] * margin * max(0.0, width - ux1)))
    bottom = int(math.ceil(height - u[3] * margin * max(0.0, height - uy1)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


class ImageSource:
    """Images -> CLIP input exactly as label-objects makes it (pipeline.clip_inputs): square
    uint8 tensors (whole images cached), normalised in batches."""

    def __init__(self, preprocess: Any, mode: str, cache: int = 4096) -> None:
        import torch

        from pipeline.clip_inputs import ClipInputSpec, Normaliser

        self.spec = ClipInputSpec.from_preprocess(preprocess, mode)
        self.normalise = Normaliser(self.spec, torch.device("cpu"))
        self.load = lru_cache(maxsize=cache)(_load_rgb)
        self._whole = lru_cache(maxsize=cache)(self._whole_uint8)

    def uint8(self, img) -> Any:
        from pipeline.clip_inputs import pil_to_chw, square_pil

        return pil_to_chw(square_pil(img, self.spec))

    def _whole_uint8(self, path: str) -> Any:
        return self.uint8(self.load(path))

    def whole(self, path: str, window: Sequence[int] | None = None, flip: bool = False) -> Any:
        """The whole image (cached), or its `window` (left, top, right, bottom), mirrored."""
        if window is None and not flip:
            return self._whole(path)
        img = self.load(path)
        if window is not None:
            img = img.crop(tuple(window))
        return self.uint8(_mirror(img) if flip else img)

    def crop(
        self,
        path: str,
        box: Sequence[float],
        padding: float,
        jitter: Any = None,
        flip: bool = False,
    ) -> Any:
        img = self.load(path)
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        if jitter is not None:  # four offsets in [-1, 1], scaled by the box size
            x0, y0, x1, y1 = (
                x0 + jitter[0] * w,
                y0 + jitter[1] * h,
                x1 + jitter[2] * w,
                y1 + jitter[3] * h,
            )
        x0, y0, x1, y1 = x0 - padding * w, y0 - padding * h, x1 + padding * w, y1 + padding * h
        left = min(max(int(math.floor(x0)), 0), img.size[0] - 1)
        top = min(max(int(math.floor(y0)), 0), img.size[1] - 1)
        right = max(min(int(math.ceil(x1)), img.size[0]), left + 1)
        bottom = max(min(int(math.ceil(y1)), img.size[1]), top + 1)
        crop = img.crop((left, top, right, bottom))
        return self.uint8(_mirror(crop) if flip else crop)

    def size(self, path: str) -> tuple[int, int]:
        return self.load(path).size

    def batch(self, tensors: list) -> Any:
        import torch

        return self.normalise(torch.stack(tensors))


# ----------------------------------------------------------------------------- losses


def info_nce(a: Any, b: Any, scale: Any) -> Any:
    """Symmetric InfoNCE between L2-normalised rows of a and b (row i of each form a pair)."""
    import torch
    import torch.nn.functional as F

    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def prompt_loss(feats: Any, prompts: Any, target: Any, scale: Any) -> Any:
    """Each image against the prompts of every candidate class: cross-entropy on its own one
    (InfoNCE whose negatives are the other classes' prompts). `prompts` [N, D] or [T, N, D]
    (one set per template: the mean of the T losses). `target`: class indices, or
    distributions over the N classes (soft cross-entropy)."""
    import torch.nn.functional as F

    sets = prompts if prompts.ndim == 3 else prompts[None]
    losses = []
    for prompt_set in sets:
        logits = scale * feats @ prompt_set.T
        if target.ndim == 2:
            losses.append(-(target * F.log_softmax(logits, dim=-1)).sum(-1).mean())
        else:
            losses.append(F.cross_entropy(logits, target))
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- training


class Teacher:
    """The open_clip model being adapted, with the prompt templates labeling will use and the
    auxiliary probes (trained with it, never saved with it)."""

    def __init__(
        self,
        preset: str,
        clip_path: str | None,
        entity_templates: Sequence[str],
        relation_templates: Sequence[str],
        n_classes: int = 0,
        n_relations: int = 0,
    ) -> None:
        import torch

        from pipeline.models import load_clip, seeded

        self.model, self.preprocess, self.tokenizer = load_clip(preset, clip_path)
        self.templates = {"entity": tuple(entity_templates), "relation": tuple(relation_templates)}
        dim = int(self.model.text_projection.shape[-1])
        with seeded(7):
            self.probes = torch.nn.ModuleDict(
                {k: torch.nn.Linear(dim, n) for k, n in (("entity", n_classes),
                                                         ("relation", n_relations)) if n > 0}
            )  # fmt: skip

    def parameters(self) -> list:
        return [*self.model.parameters(), *self.probes.parameters()]

    def scale(self, max_scale: float) -> Any:
        return self.model.logit_scale.exp().clamp(max=max_scale)

    def encode_images(self, x: Any) -> Any:
        import torch.nn.functional as F

        return F.normalize(self.model.encode_image(x), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> Any:
        import torch.nn.functional as F

        return F.normalize(self.model.encode_text(self.tokenizer(list(texts))), dim=-1)

    def prompts(self, names: Sequence[str], kind: str) -> Any:
        """Prompt embeddings [len(names), D] as embed-prompts makes them: each template
        normalised, the templates averaged, the mean normalised (prompt ensembling)."""
        import torch.nn.functional as F

        feats = self.template_prompts(names, kind)
        if feats.shape[0] == 1:
            return feats[0]
        return F.normalize(feats.mean(0), dim=-1)

    def template_prompts(self, names: Sequence[str], kind: str) -> Any:
        """[templates, len(names), D]: each template's prompts, L2-normalised."""
        from pipeline.prompts import fill_templates

        templates = self.templates[kind]
        feats = self.encode_texts(fill_templates(names, templates, kind))
        return feats.view(len(names), len(templates), -1).transpose(0, 1)

    def prompt_sets(self, names: Sequence[str], kind: str, mode: str) -> Any:
        """What a prompt objective scores against: [1, N, D] (the ensemble) or [T, N, D]
        (`each`: one loss per template, so that every template labels well on its own)."""
        if mode == "each":
            return self.template_prompts(names, kind)
        return self.prompts(names, kind)[None]


def _candidates(true: list[str], extra: list[str], k: int | None, rng_key: list[int]) -> list[str]:
    """The true classes first (targets index them), then k (all if None) vocabulary negatives."""
    if k is None or k >= len(extra):
        return true + extra
    pick = np.random.default_rng(rng_key).choice(len(extra), size=k, replace=False)
    return true + [extra[i] for i in sorted(pick)]


def _batch_indices(n: int, batch: int, seed: int, step: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([seed, step, stream])
    return rng.choice(n, size=min(batch, n), replace=False)


def _augment(n: int, p: TeacherParams, step: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item of a batch: mirror flags and four window draws (all False / zero when off)."""
    rng = np.random.default_rng([p.seed, step, 40 + stream])
    flips = rng.random(n) < 0.5 if p.flip else np.zeros(n, dtype=bool)
    windows = rng.random((n, 4)) if p.crop_margin > 0 else np.zeros((n, 4))
    return flips, windows


def _whole_batch(
    images: ImageSource,
    data: TeacherData,
    paths: list[str],
    p: TeacherParams,
    step: int,
    stream: int,
) -> Any:
    """Whole images, each cut to a window that keeps its true boxes and maybe mirrored."""
    flips, draws = _augment(len(paths), p, step, stream)
    tensors = []
    for path, flip, u in zip(paths, flips, draws, strict=True):
        window = None
        if p.crop_margin > 0 and path in data.boxes:
            window = window_keeping_boxes(images.size(path), data.boxes[path], p.crop_margin, u)
        tensors.append(images.whole(path, window, bool(flip)))
    return images.batch(tensors)


def training_loss(
    teacher: Teacher, images: ImageSource, data: TeacherData, p: TeacherParams, step: int
) -> tuple[Any, dict[str, float]]:
    """The weighted sum of the enabled objectives on this step's batches."""
    import torch
    import torch.nn.functional as F

    scale = teacher.scale(p.max_logit_scale)
    parts: dict[str, Any] = {}
    probe: dict[str, Any] = {}
    if p.weight_caption > 0 and len(data.captions) >= 2:
        idx = _batch_indices(len(data.captions), p.batch_size, p.seed, step, 0)
        x = _whole_batch(images, data, [data.captions[i][0] for i in idx], p, step, 0)
        texts = [data.captions[i][1] for i in idx]
        parts["caption"] = info_nce(teacher.encode_images(x), teacher.encode_texts(texts), scale)
    if p.weight_entity > 0 and data.crops:
        idx = _batch_indices(len(data.crops), p.batch_size, p.seed, step, 1)
        jitter = (
            np.random.default_rng([p.seed, step, 11]).uniform(-1, 1, (len(idx), 4)) * p.box_jitter
        )
        flips, _ = _augment(len(idx), p, step, 1)
        x = images.batch(
            [
                images.crop(data.crops[i][0], data.crops[i][1], p.crop_padding, j, bool(f))
                for i, j, f in zip(idx, jitter, flips, strict=True)
            ]
        )
        target = torch.tensor([data.crops[i][2] for i in idx])
        names = _candidates(data.classes, data.extra_entities, p.negatives, [p.seed, step, 21])
        feats = teacher.encode_images(x)
        prompts = teacher.prompt_sets(names, "entity", p.template_loss)
        parts["entity"] = prompt_loss(feats, prompts, target, scale)
        if p.weight_probe > 0:
            probe["entity"] = F.cross_entropy(teacher.probes["entity"](feats), target)
    if p.weight_scene > 0 and data.scenes:
        idx = _batch_indices(len(data.scenes), p.batch_size, p.seed, step, 3)
        x = _whole_batch(images, data, [data.scenes[i][0] for i in idx], p, step, 3)
        names = _candidates(data.classes, data.extra_entities, p.negatives, [p.seed, step, 23])
        target = torch.zeros(len(idx), len(names))
        for row, i in enumerate(idx):
            target[row, data.scenes[i][1]] = 1.0 / len(data.scenes[i][1])
        prompts = teacher.prompt_sets(names, "entity", p.template_loss)
        parts["scene"] = prompt_loss(teacher.encode_images(x), prompts, target, scale)
    if p.weight_relation > 0 and data.relations:
        idx = _batch_indices(len(data.relations), p.batch_size, p.seed, step, 2)
        x = _whole_batch(images, data, [data.relations[i][0] for i in idx], p, step, 2)
        target = torch.tensor([data.relations[i][1] for i in idx])
        names = _candidates(
            data.relation_labels, data.extra_relations, p.negatives, [p.seed, step, 22]
        )
        feats = teacher.encode_images(x)
        prompts = teacher.prompt_sets(names, "relation", p.template_loss)
        parts["relation"] = prompt_loss(feats, prompts, target, scale)
        if p.weight_probe > 0:
            probe["relation"] = F.cross_entropy(teacher.probes["relation"](feats), target)
    if not parts:
        raise InputError("nothing to train on: give --pairs and/or --annotations with boxes")
    weights = {
        "caption": p.weight_caption,
        "entity": p.weight_entity,
        "scene": p.weight_scene,
        "relation": p.weight_relation,
    }
    total = sum(weights[k] * v for k, v in parts.items())
    if probe:
        parts["probe"] = sum(probe.values())
        total = total + p.weight_probe * parts["probe"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def held_out_accuracy(
    teacher: Teacher, images: ImageSource, data: TeacherData, p: TeacherParams, batch: int = 256
) -> dict[str, Any]:
    """Top-1 accuracy on the held-out annotated images against every candidate (true classes
    and the whole vocabulary): what the argmax of q_ent / q_rel will be. `entity_top1` and
    `relation_top1` use the templates ensembled (as embed-prompts with all of them);
    `per_template` gives each template alone."""
    import torch

    out: dict[str, Any] = {"entity_top1": None, "relation_top1": None, "per_template": {}}
    was_training = teacher.model.training
    teacher.model.eval()
    tasks = (
        ("entity", data.held_crops, data.classes, data.extra_entities,
         lambda it: images.crop(it[0], it[1], p.crop_padding)),
        ("relation", data.held_relations, data.relation_labels,
         data.extra_relations, lambda it: images.whole(it[0])),
    )  # fmt: skip
    with torch.inference_mode():
        for kind, items, true, extra, load in tasks:
            if not items or not true:
                continue
            names = _candidates(true, extra, None, [])
            sets = teacher.template_prompts(names, kind)
            if len(sets) > 1:  # the ensemble first, then each template
                ensemble = torch.nn.functional.normalize(sets.mean(0), dim=-1)
                sets = torch.cat([ensemble[None], sets])
            prompts = sets
            right = torch.zeros(len(prompts), dtype=torch.long)
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                feats = teacher.encode_images(images.batch([load(it) for it in chunk]))
                pred = torch.einsum("bd,snd->sbn", feats, prompts).argmax(-1)
                truth = torch.tensor([it[-1] for it in chunk])
                right += (pred == truth).sum(-1)
            accuracy = [round(int(r) / len(items), 4) for r in right]
            out[f"{kind}_top1"] = accuracy[0]
            templates = teacher.templates[kind]
            per = accuracy[1:] if len(templates) > 1 else accuracy
            out["per_template"][kind] = {
                template_name(t, kind): a for t, a in zip(templates, per, strict=True)
            }
    teacher.model.train(was_training)
    return out


def template_name(template: str, kind: str) -> str:
    """A template's name in the paper's sets (1, 2, A, B, C), or the template itself."""
    from pipeline.prompts import ENTITY_TEMPLATE_SET, RELATION_TEMPLATE_SET

    table = ENTITY_TEMPLATE_SET if kind == "entity" else RELATION_TEMPLATE_SET
    return next((name for name, t in table.items() if t == template), template)


def score_teacher(
    clip_path: str | os.PathLike,
    annotations_path: str | os.PathLike,
    preset: str = "small",
    entity_templates: Sequence[str] | None = None,
    relation_templates: Sequence[str] | None = None,
    entities_path: str | os.PathLike | None = None,
    relations_path: str | os.PathLike | None = None,
    resize_mode: str = "letterbox",
) -> dict[str, Any]:
    """A teacher's top-1 on every annotated image of a truth file (e.g. the world's corpus):
    crops of the true boxes against the entity prompts, whole images against the relation
    prompts, with the vocabularies' other entries as candidates too. What the labels would
    score with a perfect detector."""
    from pipeline.prompts import ENTITY_TEMPLATES, RELATION_TEMPLATES

    data = collect_data(None, annotations_path, 0.0, 0, entities_path, relations_path)
    data.held_crops, data.held_relations = data.crops, data.relations
    teacher = Teacher(
        preset,
        str(clip_path),
        tuple(entity_templates or ENTITY_TEMPLATES),
        tuple(relation_templates or RELATION_TEMPLATES),
    )
    images = ImageSource(teacher.preprocess, resize_mode)
    params = TeacherParams(resize_mode=resize_mode)
    return {
        **held_out_accuracy(teacher, images, data, params),
        "crops": len(data.crops),
        "relation_images": len(data.relations),
    }


def _fingerprint(p: TeacherParams, inputs: dict[str, Any], start: dict) -> str:
    import hashlib

    from pmu.io import file_sha256

    files = {k: file_sha256(v) if v else None for k, v in inputs.items()}
    blob = json.dumps([asdict(p), files, start], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def plot_losses(history: list[dict[str, float]], path: str | os.PathLike) -> None:
    """Loss curves (one line per objective) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    keys = [k for k in history[0] if k not in ("step",)] if history else []
    for k in keys:
        ax.plot([h["step"] for h in history], [h[k] for h in history], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("adapt-teacher")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


@dataclass
class Adaptation:
    """One adapt-teacher run, built by `_setup`: the teacher, its data, optimizer and state."""

    settings: AdaptTeacherSettings
    teacher: Teacher
    data: TeacherData
    images: ImageSource
    trainable: Any  # the CLIP and the probes: what the resume state holds
    optimizer: Any
    scheduler: Any
    templates: tuple[tuple[str, ...], tuple[str, ...]]
    start: dict[str, Any]  # which CLIP it started from
    fingerprint: str

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    @property
    def state_dir(self) -> Path:
        return self.out.with_name(self.out.stem + ".state")


def _inputs(s: AdaptTeacherSettings) -> dict[str, str | None]:
    """The input files, checked: at least pairs or annotations, and every one given exists."""
    if not s.pairs and not s.annotations:
        raise InputError(
            "nothing to adapt on", "give --pairs (captions) and/or --annotations (boxes, classes)"
        )
    inputs = {"pairs": s.pairs, "annotations": s.annotations, "entities": s.entities,
              "relations": s.relations}  # fmt: skip
    for name, path in inputs.items():
        if path and not Path(path).is_file():
            raise InputError(f"--{name} {path}: no such file", f"pass an existing --{name} file")
    return inputs


def _setup(s: AdaptTeacherSettings, threads: int | None) -> Adaptation:
    import torch

    from pipeline.models import clip_identity
    from pipeline.prompts import named_templates
    from pmu.optim import build_optimizer, build_scheduler
    from pmu.runtime import set_threads

    params = s.params
    params.check()
    inputs = _inputs(s)
    templates = (
        named_templates(s.entity_templates, "entity"),
        named_templates(s.relation_templates, "relation"),
    )
    set_threads(threads)
    data = collect_data(
        s.pairs, s.annotations, params.holdout, params.seed, s.entities, s.relations
    )
    torch.manual_seed(params.seed)
    teacher = Teacher(s.preset, s.clip, *templates, len(data.classes), len(data.relation_labels))
    trainable = torch.nn.ModuleDict({"clip": teacher.model.train(), "probes": teacher.probes})
    optimizer = build_optimizer(
        [(trainable, params.lr)], params.weight_decay, betas=(0.9, 0.98), eps=1e-6
    )
    start = clip_identity(s.preset, s.clip)
    return Adaptation(
        settings=s,
        teacher=teacher,
        data=data,
        images=ImageSource(teacher.preprocess, params.resize_mode),
        trainable=trainable,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, params.warmup_steps, params.steps, decay="cosine"),
        templates=templates,
        start=start,
        fingerprint=_fingerprint(params, inputs, {"clip": start, "templates": list(templates)}),
    )


def _resume(run: Adaptation) -> tuple[int, list[dict[str, float]]]:
    """(step, loss history) of the saved state with --resume, else (0, [])."""
    from pmu.train_state import load_training_state, saved_info

    info = saved_info(run.state_dir) if run.settings.resume else None
    if info is None:
        return 0, []
    if info.get("fingerprint") != run.fingerprint:
        raise InputError(
            f"--resume refused: {run.state_dir} was made from other inputs or parameters",
            "delete it to start over, or resume with the settings it was made with",
        )
    state = load_training_state(run.state_dir, run.trainable, run.optimizer, run.scheduler)
    print(f"adapt-teacher: resumed at step {state['step']} from {run.state_dir}")
    return state["step"], state["history"]


def adapt_teacher(
    settings: AdaptTeacherSettings,
    *,
    progress: bool = True,
    threads: int | None = None,
    stop_after_steps: int | None = None,
    log_every: int = 20,
) -> dict[str, Any]:
    """Adapt the teacher and write `settings.out` (open_clip .safetensors) + `.json` + `.png`.

    `stop_after_steps` ends early (as a kill would) once that step's state is saved.
    """
    import torch
    from tqdm import tqdm

    from pmu.train_state import save_training_state

    t0 = time.perf_counter()
    run = _setup(settings, threads)
    p = settings.params
    step, history = _resume(run)
    window: list[dict[str, float]] = []
    bar = tqdm(total=p.steps, initial=step, desc="adapt-teacher", unit="step", disable=not progress)
    while step < p.steps:
        loss, parts = training_loss(run.teacher, run.images, run.data, p, step)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.teacher.parameters(), 1.0)
        run.optimizer.step()
        run.scheduler.step()
        step += 1
        window.append(parts)
        if step % log_every == 0 or step == p.steps:
            mean = {k: round(sum(w[k] for w in window) / len(window), 5) for k in window[0]}
            history.append({"step": step, **mean})
            window = []
            bar.set_postfix({k: f"{v:.3f}" for k, v in mean.items()})
        bar.update(1)
        if step % settings.ckpt_every == 0 or step == p.steps:
            info = {"step": step, "history": history, "fingerprint": run.fingerprint}
            save_training_state(run.state_dir, run.trainable, run.optimizer, run.scheduler, info)
            if stop_after_steps is not None and step >= stop_after_steps < p.steps:
                bar.close()
                return {"interrupted_after_step": step, "state": str(run.state_dir)}
    bar.close()
    summary = _finish(run, step, history)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _finish(run: Adaptation, step: int, history: list[dict[str, float]]) -> dict[str, Any]:
    """Held-out accuracy; the weights, the summary JSON and the loss plot; the state removed."""
    from safetensors.torch import save_file

    from pipeline.models import clip_identity
    from pmu.io import write_json_atomic

    held = held_out_accuracy(run.teacher, run.images, run.data, run.settings.params)
    model, data, out = run.teacher.model.eval(), run.data, run.out
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(weights, str(tmp))
    summary = {
        "out": str(out),
        "start": run.start,
        "weights_sha256": clip_identity(run.settings.preset, out)["weights"],
        "steps": step,
        "params": asdict(run.settings.params),
        "templates": {"entity": list(run.templates[0]), "relation": list(run.templates[1])},
        "data": {
            "caption_pairs": len(data.captions),
            "crops": len(data.crops),
            "relation_images": len(data.relations),
            "held_out_crops": len(data.held_crops),
            "held_out_relation_images": len(data.held_relations),
            "classes": data.classes,
            "relations": data.relation_labels,
            "vocabulary_negatives": {
                "entities": len(data.extra_entities),
                "relations": len(data.extra_relations),
            },
        },
        "loss_first": history[0] if history else {},
        "loss_last": history[-1] if history else {},
        "held_out": held,
        "history": history,
    }
    write_json_atomic(out.with_suffix(".json"), summary)
    if history:
        plot_losses(history, out.with_suffix(".png"))
    shutil.rmtree(run.state_dir, ignore_errors=True)
    return summary


def run_stage(settings: AdaptTeacherSettings, *, progress: bool = True) -> str:
    """adapt-teacher as the command runs it; returns what it prints."""
    s = adapt_teacher(settings, progress=progress)
    first, last, held, data = s["loss_first"], s["loss_last"], s["held_out"], s["data"]
    losses = ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in last if k != "step")
    return (
        f"adapt-teacher: {s['steps']} steps in {s['seconds']} s -> {s['out']} (+ .json, .png)\n"
        f"  data: {data['caption_pairs']} caption pairs, {data['crops']} crops of "
        f"{len(data['classes'])} classes, {data['relation_images']} relation images\n"
        f"  loss first -> last: {losses}\n"
        f"  held-out top-1: entity {held['entity_top1']}, relation {held['relation_top1']}"
    )
