"""embed-prompts: every entity and relation prompt encoded once by the CLIP text tower."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.settings import EmbedPromptsSettings
from pmu.errors import InputError

# The paper's templates by name. Its main setting is (1) + (A); any set can be ensembled.
ENTITY_TEMPLATE_SET = {
    "1": "This is an image of {entity}.",
    "2": "An image of {entity} is shown here.",
}
RELATION_TEMPLATE_SET = {
    "A": "This image shows the relation of {relation}.",
    "B": "The relation of {relation} is shown in this image.",
    "C": "The relation between the objects in the image is {relation}.",
}
ENTITY_TEMPLATES = (ENTITY_TEMPLATE_SET["1"],)
RELATION_TEMPLATES = (RELATION_TEMPLATE_SET["A"],)


def named_templates(spec: str, kind: str) -> tuple[str, ...]:
    """Templates for a name spec: `1`, `A`, `B+C` (an ensemble) or `all` (every template).

    kind: `entity` or `relation`."""
    table = {"entity": ENTITY_TEMPLATE_SET, "relation": RELATION_TEMPLATE_SET}[kind]
    names = list(table) if spec.strip().lower() == "all" else spec.replace(" ", "").split("+")
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise InputError(
            f"unknown {kind} template name(s) {unknown or spec!r}: choose from {sorted(table)}, "
            f"joined with + to ensemble (e.g. {'+'.join(table)}), or all"
        )
    return tuple(table[n] for n in dict.fromkeys(names))


def read_entity_names(path: str | os.PathLike) -> list[str]:
    return [e["name"] for e in json.loads(Path(path).read_text(encoding="utf-8"))["entities"]]


def read_relation_labels(path: str | os.PathLike) -> list[str]:
    return [r["label"] for r in json.loads(Path(path).read_text(encoding="utf-8"))["relations"]]


def fill_templates(names: Sequence[str], templates: Sequence[str], field: str) -> list[str]:
    """Prompts name-major: [n0 t0, n0 t1, ..., n1 t0, ...]."""
    if not templates:
        raise InputError(f"no {field} templates given")
    for t in templates:
        if "{" + field + "}" not in t:
            raise InputError(f"template {t!r} has no {{{field}}} placeholder")
    return [t.replace("{" + field + "}", name) for name in names for t in templates]


def encode_prompts(
    model: Any,
    tokenizer: Any,
    names: Sequence[str],
    templates: Sequence[str],
    field: str,
    batch_size: int,
    device: Any,
) -> Any:
    """[len(names), D] float32: per-template L2-normalised embeddings, averaged, renormalised."""
    import torch
    import torch.nn.functional as F

    from pmu.runtime import autocast

    texts = fill_templates(names, templates, field)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start : start + batch_size]).to(device, non_blocking=True)
            with autocast(device):
                feats = model.encode_text(tokens)
            chunks.append(F.normalize(feats.float(), dim=-1).cpu())
    feats = torch.cat(chunks).view(len(names), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1).contiguous()


def embed_prompts(
    entities_path: str | os.PathLike,
    relations_path: str | os.PathLike,
    out_path: str | os.PathLike,
    preset: str = "tiny",
    clip_path: str | os.PathLike | None = None,
    entity_templates: Sequence[str] = ENTITY_TEMPLATES,
    relation_templates: Sequence[str] = RELATION_TEMPLATES,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, Any]:
    """Write prompts.safetensors: `entity` [M, D] and `relation` [L, D] plus provenance metadata."""
    from pipeline.models import clip_identity, load_clip
    from pmu.io import file_sha256, safetensors_bytes, write_bytes_atomic
    from pmu.runtime import select_device, set_threads

    set_threads()
    entities = read_entity_names(entities_path)
    relations = read_relation_labels(relations_path)
    if not entities or not relations:
        raise InputError(
            f"empty vocabulary: {len(entities)} entities in {entities_path}, "
            f"{len(relations)} relations in {relations_path}"
        )
    dev = select_device(device)
    t0 = time.perf_counter()
    model, _, tokenizer = load_clip(preset, clip_path)
    model = model.to(dev)
    tensors = {
        "entity": encode_prompts(
            model, tokenizer, entities, entity_templates, "entity", batch_size, dev
        ),
        "relation": encode_prompts(
            model, tokenizer, relations, relation_templates, "relation", batch_size, dev
        ),
    }
    identity = clip_identity(preset, clip_path)
    metadata = {
        "clip_model": identity["model"],
        "clip_weights": identity["weights"],
        "clip_source": str(identity["source"]),
        "preset": preset,
        "templates_entity": json.dumps(list(entity_templates)),
        "templates_relation": json.dumps(list(relation_templates)),
        "entities_sha256": file_sha256(entities_path),
        "relations_sha256": file_sha256(relations_path),
    }
    out_path = Path(out_path)
    write_bytes_atomic(out_path, safetensors_bytes(tensors, metadata))
    return {
        "entities": len(entities),
        "relations": len(relations),
        "dim": int(tensors["entity"].shape[1]),
        "prompts_encoded": len(entities) * len(entity_templates)
        + len(relations) * len(relation_templates),
        "seconds": round(time.perf_counter() - t0, 2),
        "out": str(out_path),
    }


def load_prompts(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a prompts.safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_prompt_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a prompts.safetensors file, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def run_stage(settings: EmbedPromptsSettings) -> str:
    """embed-prompts as the command runs it: checks, the templates, the embeddings."""
    from pipeline import checks

    s = settings
    checks.vocabulary(s.entities, "entities")
    checks.vocabulary(s.relations, "relations")
    for field, templates in (("entity", s.entity_template), ("relation", s.relation_template)):
        for template in templates:
            if "{" + field + "}" not in template:
                raise InputError(
                    f"--{field}-template {template!r} has no {{{field}}} placeholder",
                    f"write the {field} as {{{field}}}, e.g. 'This is an image of {{{field}}}.'",
                )
    checks.preset(s.preset)
    checks.weights_file(s.clip, "CLIP checkpoint", "--clip")
    checks.device(s.device)
    ent_t = tuple(s.entity_template) or named_templates(s.entity_templates, "entity")
    rel_t = tuple(s.relation_template) or named_templates(s.relation_templates, "relation")
    r = embed_prompts(
        s.entities, s.relations, s.out, s.preset, s.clip, ent_t, rel_t, s.batch_size, s.device
    )
    return (
        f"embed-prompts: {r['entities']} entities, {r['relations']} relations "
        f"({r['prompts_encoded']} prompts, dim {r['dim']}) in {r['seconds']} s -> {r['out']}"
    )
