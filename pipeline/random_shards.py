"""Random shards that keep the shard contract (random images, boxes and top-k labels), for
tests and loader benchmarks. Not the synthetic *world* (`pipeline/world/`), whose images and
labels have a known truth."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pmu import shards
from pmu.io import write_json_atomic


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _topk_distribution(
    rng: np.random.Generator, size: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(size=size) * 3
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    idx = np.argsort(-probs, kind="stable")[:k]
    return idx.astype(np.int32), probs[idx].astype(np.float32)


def random_sample(
    rng: np.random.Generator,
    i: int,
    n_entities: int,
    n_relations: int,
    k: tuple[int, int],
    max_objects: int,
    image_size: tuple[int, int],
) -> shards.LabelledSample:
    """Sample `i`: 0 to `max_objects` random boxes with top-k labels, a random JPEG."""
    k_ent, k_rel = k
    n_obj = int(rng.integers(0, max_objects + 1))
    x0y0 = rng.uniform(0, 0.6, size=(n_obj, 2))
    wh = rng.uniform(0.05, 0.4, size=(n_obj, 2))
    boxes = np.concatenate([x0y0, np.minimum(x0y0 + wh, 1.0)], axis=1).round(4)
    ent = [_topk_distribution(rng, n_entities, k_ent) for _ in range(n_obj)]
    ent_idx = np.stack([e[0] for e in ent]) if ent else np.zeros((0, k_ent), np.int32)
    ent_prob = np.stack([e[1] for e in ent]) if ent else np.zeros((0, k_ent), np.float32)
    rel_idx, rel_prob = _topk_distribution(rng, n_relations, k_rel)
    meta = {
        "source": "synthetic",
        "itm": int(i % 4 != 3),
        "width": image_size[0],
        "height": image_size[1],
        "boxes": boxes.tolist(),
        "box_classes": ["object"] * n_obj,
        "box_confs": [0.5] * n_obj,
        "ent_mass": [float(p.sum()) for p in ent_prob],
        "rel_mass": float(rel_prob.sum()),
    }
    return shards.LabelledSample(
        id=f"synthetic-{i:05d}",
        jpg=_jpeg(rng, *image_size),
        caption=f"a synthetic caption number {i} about entity {i % n_entities}",
        meta=meta,
        ent_idx=ent_idx,
        ent_prob=ent_prob,
        rel_idx=rel_idx,
        rel_prob=rel_prob,
    )


def write_random_shards(
    out_dir: str | os.PathLike,
    n_samples: int = 16,
    samples_per_shard: int = 8,
    n_entities: int = 20,
    n_relations: int = 10,
    top_k: int = 5,
    max_objects: int = 3,
    image_size: tuple[int, int] = (96, 64),
    seed: int = 0,
) -> Path:
    """Write shards, sizes.json, manifest.json and vocabularies; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = (min(top_k, n_entities), min(top_k, n_relations))
    samples = [
        random_sample(rng, i, n_entities, n_relations, k, max_objects, image_size)
        for i in range(n_samples)
    ]
    sizes = {}
    for s, start in enumerate(range(0, n_samples, samples_per_shard)):
        name = shards.SHARD_PATTERN.format(s)
        sizes[name] = shards.write_shard(out / name, samples[start : start + samples_per_shard])
    write_json_atomic(out / shards.SIZES_FILE, sizes)
    entities = [{"name": f"entity{i}", "count": 1} for i in range(n_entities)]
    write_json_atomic(out / shards.ENTITIES_FILE, {"source": "synthetic", "entities": entities})
    relations = [{"pid": f"P{i + 1}", "label": f"relation {i}"} for i in range(n_relations)]
    write_json_atomic(out / shards.RELATIONS_FILE, {"source": "synthetic", "relations": relations})
    write_json_atomic(
        out / shards.MANIFEST_FILE,
        {
            "contract_version": shards.CONTRACT_VERSION,
            "creator": "pipeline.random_shards",
            "preset": "synthetic",
            "counts": {"samples": n_samples, "shards": len(sizes), "rejected": 0},
            "params": {"top_k_ent": k[0], "top_k_rel": k[1], "seed": seed},
            "files": shards.hash_shards(out, sizes),
        },
    )
    return out
