"""The `inspect` stage: shards -> one self-contained HTML report (+ the summary it shows)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.report import html, images
from pipeline.report.collect import MAX_LISTED, LabelStats, scan_shards
from pipeline.report.plots import histograms_png
from pipeline.settings import InspectSettings
from pmu import shards
from pmu.errors import InputError
from pmu.io import write_text_atomic

MAX_REJECTED_LISTED = 200


def _read_manifest(shard_dir: Path) -> tuple[dict[str, Any], str | None]:
    path = shard_dir / shards.MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"{shards.MANIFEST_FILE} is missing"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {}, f"{shards.MANIFEST_FILE} is not valid JSON: {exc}"
    if not isinstance(manifest, dict):
        return {}, f"{shards.MANIFEST_FILE} is not a JSON object"
    return manifest, None


def rejected_from_manifest(manifest: dict[str, Any]) -> tuple[dict[str, int], list[dict], int]:
    """(count by reason, listed {id, reason}, total) from the manifest's `rejected` entry.

    Accepts a dict holding a reason -> count mapping and/or a list of {id, reason}, or a bare
    list; counts by reason are derived from the list when the mapping is absent.
    """
    rejected = manifest.get("rejected")
    by_reason: dict[str, int] = {}
    items: list[dict] = []
    if isinstance(rejected, list):
        items = [r for r in rejected if isinstance(r, dict)]
    elif isinstance(rejected, dict):
        for value in rejected.values():
            if isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
                by_reason = by_reason or {str(k): int(v) for k, v in value.items()}
            elif isinstance(value, list):
                items = items or [r for r in value if isinstance(r, dict)]
    if not by_reason and items:
        by_reason = dict(Counter(str(r.get("reason", "?")) for r in items))
    total = sum(by_reason.values())
    counted = (
        manifest.get("counts", {}).get("rejected")
        if isinstance(manifest.get("counts"), dict)
        else None
    )
    if isinstance(counted, int) and counted > total:
        total = counted
    return by_reason, items[:MAX_REJECTED_LISTED], total


def _top(idx: np.ndarray, prob: np.ndarray, names: list[str]) -> list[tuple[str, float]]:
    order = np.argsort(-prob.astype(np.float64), kind="stable")[: html.TOP]
    return [(html.label_name(int(idx[i]), names), float(prob[i])) for i in order]


def make_card(
    index: int, raw: dict[str, bytes], entity_names: list[str], relation_names: list[str]
) -> html.CardView:
    """One sampled sample -> what its card shows (bad images become an error line)."""
    sample = shards.decode_sample(raw)
    meta = sample["meta"]
    boxes = list(meta.get("boxes", []))
    classes = list(meta.get("box_classes", []))
    confs = list(meta.get("box_confs", []))
    masses = list(meta.get("ent_mass", []))
    ent_idx, ent_prob = np.atleast_2d(sample["ent_idx"]), np.atleast_2d(sample["ent_prob"])
    n_labelled = ent_idx.shape[0] if ent_idx.size else 0
    rel_idx, rel_prob = np.ravel(sample["rel_idx"]), np.ravel(sample["rel_prob"])
    card = html.CardView(
        index=index,
        sample_id=str(meta.get("id", sample["__key__"])),
        source=str(meta.get("source", "?")),
        itm=meta.get("itm"),
        caption=sample["caption"],
        width=meta.get("width"),
        height=meta.get("height"),
        picture_uri=None,
        relations=_top(rel_idx, rel_prob, relation_names),
        rel_mass=float(meta["rel_mass"]) if "rel_mass" in meta else float(rel_prob.sum()),
    )
    if n_labelled != len(boxes):
        card.errors.append(f"{len(boxes)} boxes but {n_labelled} entity label rows")
    try:
        img = images.decode_image(sample["jpg"])
    except ValueError as exc:
        img = None
        card.errors.append(str(exc))
    if img is not None:
        card.picture_uri = images.data_uri(images.annotate(img, boxes))
    for o in range(max(len(boxes), n_labelled)):
        has_box = o < len(boxes)
        card.objects.append(
            html.ObjectView(
                number=o + 1,
                colour=images.box_colour(o),
                box_class=str(classes[o]) if o < len(classes) else "(no class)",
                conf=float(confs[o]) if o < len(confs) else None,
                crop_uri=images.data_uri(images.crop_thumbnail(img, boxes[o]))
                if img is not None and has_box
                else None,
                labels=_top(ent_idx[o], ent_prob[o], entity_names) if o < n_labelled else [],
                kept_mass=float(masses[o])
                if o < len(masses)
                else (float(ent_prob[o].sum()) if o < n_labelled else None),
            )
        )
    return card


def _mean(h: Any) -> float | None:
    return round(h.mean, 4) if h.n else None


def _beyond(h: Any) -> float | None:
    return round(1 - h.mean, 4) if h.n else None


def sharpness_rows(stats: LabelStats, manifest: dict[str, Any]) -> list[list[str]]:
    """Per label kind: mean top-1 mass, mass beyond it, entropy (exact from the manifest, which
    label-objects computed on the full distributions; else the shards' lower bound)."""
    exact = manifest.get("label_sharpness") if isinstance(manifest, dict) else None
    rows = []
    for kind, top1, entropy, size in (
        ("q_ent", stats.ent_top1_mass, stats.ent_entropy, stats.n_entities),
        ("q_rel", stats.rel_top1_mass, stats.rel_entropy, stats.n_relations),
    ):
        fig = (exact or {}).get(kind) or {}
        if fig.get("mean_entropy_nats") is not None:
            ent = f"{fig['mean_entropy_nats']:.3f}"
        else:
            ent = f">= {entropy.mean:.3f}" if entropy.n else "-"
        rows.append(
            [
                kind,
                f"{top1.mean:.3f}" if top1.n else "-",
                f"{1 - top1.mean:.3f}" if top1.n else "-",
                ent,
                f"{math.log(size):.3f}" if size > 1 else "-",
            ]
        )
    return rows


def _summary(
    stats: LabelStats,
    out: Path,
    n_cards: int,
    rejected_total: int,
    rejected_by_reason: dict[str, int],
    warnings: list[str],
) -> dict[str, Any]:
    return {
        "out": str(out),
        "bytes": out.stat().st_size,
        "samples": stats.samples,
        "sampled": n_cards,
        "shards_read": stats.shards_read,
        "objects": stats.objects,
        "images_without_detections": stats.no_detections,
        "itm": {str(k): v for k, v in sorted(stats.itm.items())},
        "rejected": rejected_total,
        "rejected_by_reason": rejected_by_reason,
        "unreadable": stats.unreadable_count,
        "mean_entropy_ent": round(stats.ent_entropy.mean, 4) if stats.ent_entropy.n else None,
        "mean_entropy_rel": round(stats.rel_entropy.mean, 4) if stats.rel_entropy.n else None,
        "mean_kept_mass_ent": round(stats.ent_mass.mean, 4) if stats.ent_mass.n else None,
        "mean_kept_mass_rel": round(stats.rel_mass.mean, 4) if stats.rel_mass.n else None,
        "mean_top1_mass_ent": _mean(stats.ent_top1_mass),
        "mean_top1_mass_rel": _mean(stats.rel_top1_mass),
        "mean_mass_beyond_top1_ent": _beyond(stats.ent_top1_mass),
        "mean_mass_beyond_top1_rel": _beyond(stats.rel_top1_mass),
        "warnings": warnings,
    }


def build_report(
    shard_dir: str | os.PathLike,
    out: str | os.PathLike,
    samples: int = 48,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write one self-contained HTML report of `samples` seeded random samples + label statistics.

    Reads only the shard contract (tars, manifest.json, entities.json, relations.json). The same
    shards and seed give a byte-identical file. Returns the summary the page shows.
    """
    if samples < 0:
        raise InputError(f"samples must be >= 0, got {samples}")
    shard_dir, out = Path(shard_dir), Path(out)
    if not shard_dir.is_dir():
        raise InputError(f"shard folder {shard_dir} does not exist")
    entity_names, relation_names = shards.read_vocabularies(shard_dir)
    manifest, manifest_warning = _read_manifest(shard_dir)
    warnings = [manifest_warning] if manifest_warning else []
    stats, reservoir = scan_shards(
        shard_dir, samples, seed, len(entity_names), len(relation_names), progress=progress
    )
    cards = [make_card(i, raw, entity_names, relation_names) for i, raw in reservoir]
    by_reason, rejected_items, rejected_total = rejected_from_manifest(manifest)
    counts = manifest.get("counts", {}) if isinstance(manifest.get("counts"), dict) else {}
    if counts.get("samples") not in (None, stats.samples):
        warnings.append(
            f"manifest counts {counts.get('samples')} samples, the shards hold {stats.samples}"
        )
    count_rows = [
        ("samples", stats.samples),
        ("shards read", f"{stats.shards_read} of {len(shards.shard_paths(shard_dir))}"),
        ("objects", stats.objects),
        ("objects per image", f"{stats.objects / stats.samples:.2f}" if stats.samples else "-"),
        ("images without detections", stats.no_detections),
        ("itm=1 matched", stats.itm.get(1, 0)),
        ("itm=0 mismatched", stats.itm.get(0, 0)),
        ("rejected (manifest)", rejected_total),
        ("unreadable shards/samples", stats.unreadable_count),
        ("entity vocabulary M", len(entity_names)),
        ("relation vocabulary L", len(relation_names)),
    ]
    count_rows += [(f"source {k}", v) for k, v in sorted(stats.sources.items())]
    count_rows += [("warning", w) for w in warnings]
    extra = {k: v for k, v in manifest.items() if k not in ("rejected", "counts")}
    page = html.render_page(
        title="Soft-label inspection",
        header_rows=[
            ("shards", shard_dir.name or str(shard_dir)),
            ("preset", manifest.get("preset", "?")),
            ("samples shown", len(cards)),
            ("seed", seed),
        ],
        count_rows=count_rows,
        manifest_counts=counts,
        rejected_by_reason=by_reason,
        rejected_items=rejected_items,
        rejected_total=rejected_total,
        no_detection_ids=stats.no_detection_ids[:MAX_LISTED],
        unreadable=stats.unreadable,
        histogram_uri=images.png_data_uri(histograms_png(stats)),
        top1_entity=stats.top1_entity,
        top1_relation=stats.top1_relation,
        box_classes=stats.box_classes,
        entity_names=entity_names,
        relation_names=relation_names,
        n_objects=stats.objects,
        n_images=stats.samples,
        manifest_extra=extra,
        sharpness=sharpness_rows(stats, manifest),
        cards=cards,
    )
    write_text_atomic(out, page)
    return _summary(stats, out, len(cards), rejected_total, by_reason, warnings)


def run_stage(settings: InspectSettings) -> str:
    """inspect as the command runs it; returns what it prints."""
    from pipeline import checks

    checks.readable_shard_folder(settings.shard_dir)
    s = build_report(settings.shard_dir, settings.out, samples=settings.samples, seed=settings.seed)
    lines = [
        f"inspect: {s['out']} ({s['bytes'] / 1e6:.1f} MB): {s['sampled']} of {s['samples']} "
        f"samples shown, {s['objects']} objects, {s['images_without_detections']} images without "
        f"detections, {s['rejected']} rejected, {s['unreadable']} unreadable",
        f"  mean entropy q_ent {s['mean_entropy_ent']} / q_rel {s['mean_entropy_rel']} nats; "
        f"mean kept mass q_ent {s['mean_kept_mass_ent']} / q_rel {s['mean_kept_mass_rel']}; "
        f"mean top-1 mass q_ent {s['mean_top1_mass_ent']} / q_rel {s['mean_top1_mass_rel']}",
    ]
    return "\n".join(lines + [f"  warning: {w}" for w in s["warnings"]])
