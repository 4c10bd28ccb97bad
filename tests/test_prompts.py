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
    named_templates,
)
from pmu.errors import InputError
from pmu.io import file_sha256


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
    assert summary["prompts_encoded"] == len(ENTITIES) + len(RELATIONS)  # 1 template each

    # Independent computation for one entity: encode each template alone, average, normalise.
    model, _, tokenizer = load_clip("tiny")
    ensemble = tmp_path / "ensemble.safetensors"
    both = named_templates("1+2", "entity")
    embed_prompts(vocab["entities"], vocab["relations"], ensemble, entity_templates=both)
    ent = load_prompts(ensemble)[0]["entity"]
    with torch.inference_mode():
        per_template = F.normalize(
            model.encode_text(tokenizer([t.format(entity="dog") for t in both])), dim=-1
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
    embed_prompts(
        vocab["entities"], vocab["relations"], c, entity_templates=named_templates("2", "entity")
    )
    assert a.read_bytes() == b.read_bytes()
    ent_a, ent_c = load_prompts(a)[0]["entity"], load_prompts(c)[0]["entity"]
    assert not torch.allclose(ent_a, ent_c)


def test_bad_templates_and_empty_vocabularies_are_refused(vocab, tmp_path):
    with pytest.raises(InputError, match="placeholder"):
        fill_templates(["dog"], ["A photo of {relation}."], "entity")
    with pytest.raises(InputError, match="no entity templates"):
        fill_templates(["dog"], [], "entity")
    empty = tmp_path / "entities.json"
    empty.write_text(json.dumps({"source": "x", "entities": []}), encoding="utf-8")
    with pytest.raises(InputError, match="empty vocabulary"):
        embed_prompts(empty, vocab["relations"], tmp_path / "p.safetensors")


def test_the_papers_templates_by_name():
    # the paper's main setting (1) + (A) is the default
    assert ENTITY_TEMPLATES == ("This is an image of {entity}.",)
    assert RELATION_TEMPLATES == ("This image shows the relation of {relation}.",)
    assert named_templates("B", "relation") == (
        "The relation of {relation} is shown in this image.",
    )
    assert named_templates("C", "relation") == (
        "The relation between the objects in the image is {relation}.",
    )
    assert len(named_templates("all", "relation")) == 3
    assert named_templates("A+C", "relation") == named_templates("A", "relation") + named_templates(
        "C", "relation"
    )
    assert named_templates("2", "entity") == ("An image of {entity} is shown here.",)
    with pytest.raises(InputError, match="choose from"):
        named_templates("D", "relation")


def test_cli_template_names(vocab, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "p.safetensors"
    args = ["embed-prompts", "--entities", str(vocab["entities"]), "--relations"]
    args += [str(vocab["relations"]), "--out", str(out), "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--relation-templates", "B+C"])
    assert res.exit_code == 0, res.output
    meta = load_prompts(out)[1]
    assert json.loads(meta["templates_relation"]) == list(named_templates("B+C", "relation"))
    assert json.loads(meta["templates_entity"]) == list(ENTITY_TEMPLATES)
    res = CliRunner().invoke(app, [*args, "--relation-templates", "Z"])
    assert res.exit_code == 2 and "choose from" in res.output
