"""embed-prompts: template ensembles encoded once, L2-normalised, with provenance metadata."""

import json

import pytest
import torch
import torch.nn.functional as F
from labeling_inputs import ENTITIES, RELATIONS, write_labeling_inputs

from pipeline.models import load_clip
from pipeline.prompts import (
    ENTITY_TEMPLATES,
    RELATION_TEMPLATES,
    embed_prompts,
    fill_templates,
    load_prompts,
)
from pipeline.shards import file_sha256


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_labeling_inputs(tmp_path_factory.mktemp("prompts"), n=2)


def test_embeddings_are_normalised_template_means(vocab, tmp_path):
    out = tmp_path / "prompts.safetensors"
    summary = embed_prompts(vocab["entities"], vocab["relations"], out, batch_size=7)
    tensors, meta = load_prompts(out)
    ent, rel = tensors["entity"], tensors["relation"]
    assert ent.dtype == rel.dtype == torch.float32
    assert ent.shape == (len(ENTITIES), 64) and rel.shape == (len(RELATIONS), 64)
    assert torch.allclose(ent.norm(dim=1), torch.ones(len(ENTITIES)), atol=1e-5)
    assert summary["prompts_encoded"] == 2 * len(ENTITIES) + len(RELATIONS)

    # Independent computation for one entity: encode each template alone, average, normalise.
    model, _, tokenizer = load_clip("tiny")
    with torch.inference_mode():
        per_template = F.normalize(
            model.encode_text(tokenizer([t.format(entity="dog") for t in ENTITY_TEMPLATES])), dim=-1
        )
        single = F.normalize(
            model.encode_text(tokenizer([RELATION_TEMPLATES[0].format(relation="country")])), dim=-1
        )
    assert torch.allclose(
        ent[ENTITIES.index("dog")], F.normalize(per_template.mean(0), dim=0), atol=1e-5
    )
    assert torch.allclose(rel[1], single[0], atol=1e-5)

    assert meta["clip_model"] == "pmu-tiny-clip" and meta["preset"] == "tiny"
    assert json.loads(meta["templates_entity"]) == list(ENTITY_TEMPLATES)
    assert json.loads(meta["templates_relation"]) == list(RELATION_TEMPLATES)
    assert meta["entities_sha256"] == file_sha256(vocab["entities"])
    assert meta["relations_sha256"] == file_sha256(vocab["relations"])


def test_output_is_byte_identical_and_templates_matter(vocab, tmp_path):
    a, b, c = (tmp_path / f"{x}.safetensors" for x in "abc")
    embed_prompts(vocab["entities"], vocab["relations"], a)
    embed_prompts(vocab["entities"], vocab["relations"], b)
    embed_prompts(vocab["entities"], vocab["relations"], c, entity_templates=ENTITY_TEMPLATES[:1])
    assert a.read_bytes() == b.read_bytes()
    ent_a, ent_c = load_prompts(a)[0]["entity"], load_prompts(c)[0]["entity"]
    assert not torch.allclose(ent_a, ent_c)


def test_bad_templates_and_empty_vocabularies_are_refused(vocab, tmp_path):
    with pytest.raises(ValueError, match="placeholder"):
        fill_templates(["dog"], ["A photo of {relation}."], "entity")
    with pytest.raises(ValueError, match="no entity templates"):
        fill_templates(["dog"], [], "entity")
    empty = tmp_path / "entities.json"
    empty.write_text(json.dumps({"source": "x", "entities": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="empty vocabulary"):
        embed_prompts(empty, vocab["relations"], tmp_path / "p.safetensors")
