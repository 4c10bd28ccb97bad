"""The shared optimizer factory: one weight-decay rule, per-part learning rates, the schedule."""

import pytest
import torch

from pmu.optim import build_optimizer, decayed_parameters, param_groups, warmup_linear
from trainer.factory import build_model
from trainer.heads import CRFTagger
from trainer.model import ModelConfig


def test_only_linear_and_conv_weights_decay():
    model = build_model(ModelConfig(n_entities=5, n_relations=3))
    decayed = decayed_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[i] for i in decayed}
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed_names
    assert "vit.embeddings.patch_embeddings.projection.weight" in decayed_names  # a conv
    assert "fc_ent.weight" in decayed_names and "patch_proj.0.weight" in decayed_names
    for name in (
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.attention.self.query.bias",
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.layernorm.weight",
        "patch_proj.1.weight",  # the patch projection's LayerNorm
        "image_type_embedding",
        "temp",
    ):
        assert name in names.values(), name
        assert name not in decayed_names, name
    groups = param_groups(model, 0.01)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_crf_transitions_get_their_own_lr_and_no_decay():
    head = CRFTagger(16, 9)
    crf = list(head.crf.parameters())
    assert len(crf) == 3  # start, end and pairwise transitions
    encoder = torch.nn.Linear(4, 4)
    opt = build_optimizer([(encoder, 5e-5), (head, 1e-3, crf), (head.crf, 5e-2)], 0.01)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert all(by_param[id(p)] == (5e-2, 0.0) for p in crf)
    assert by_param[id(head.emit.weight)] == (1e-3, 0.01)
    assert by_param[id(head.emit.bias)] == (1e-3, 0.0)
    assert by_param[id(encoder.weight)] == (5e-5, 0.01)
    assert len(by_param) == 2 + 2 + 3  # every parameter exactly once


def test_warmup_then_linear_decay():
    f = warmup_linear(4, 10)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(7) == pytest.approx(0.5) and f(10) == 0.0 and f(12) == 0.0
