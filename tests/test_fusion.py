"""The fusion interface: every registered fusion gives the states the losses read, the HVP
fusion is BERT without an image, pretrains with a falling loss and fine-tunes both tasks."""

import dataclasses

import pytest
import torch
from conftest import REPO_ROOT

from trainer import fusion as registry
from trainer import pretrain
from trainer.factory import FUSIONS, build_model, build_tokenizer, load_pretrained
from trainer.finetune_config import FinetuneConfig
from trainer.finetune_loop import run_finetune
from trainer.fusion import FusionStates
from trainer.model import ModelConfig

SAMPLE = REPO_ROOT / "trainer" / "sample"


def batch(cfg: ModelConfig, tokenizer, n_boxes: int = 3):
    torch.manual_seed(0)
    enc = tokenizer(["a dog and a man play", "a flag"], padding=True, return_tensors="pt")
    pixels = torch.randint(0, 256, (2, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    boxes = torch.zeros(2, n_boxes, 4)
    boxes[0, :2] = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.3, 0.2, 0.9, 0.8]])
    boxes[1, 0] = torch.tensor([0.2, 0.2, 0.6, 0.7])
    return enc, pixels, boxes


@pytest.mark.parametrize("name", ["albef", "hvp"])
def test_each_fusion_gives_the_states_the_losses_read(name):
    assert set(FUSIONS) >= {"albef", "hvp"}
    cfg = ModelConfig(fusion=name, n_entities=7, n_relations=5)
    model = build_model(cfg).eval()
    enc, pixels, boxes = batch(cfg, build_tokenizer(cfg))
    with torch.no_grad():
        states, _ = model.states(enc.input_ids, enc.attention_mask, pixels, boxes)
        out = model(enc.input_ids, enc.attention_mask, pixels, boxes=boxes)
    h, b, t = model.hidden_size, 2, enc.input_ids.shape[1]
    assert isinstance(states, FusionStates)
    assert states.cls.shape == states.relation.shape == (b, h)
    assert states.objects.shape == (b, 3, h)  # one state per box
    assert states.text_cls.shape[0] == states.image_cls.shape[0] == b
    assert out["itm_logits"].shape == (b, 2) and out["ent_logits"].shape == (b, 3, 7)
    assert out["rel_logits"].shape == (b, 5) and out["text_emb"].shape == out["image_emb"].shape
    tokens = model.text_states(enc.input_ids, enc.attention_mask, pixels, torch.ones(b).bool())
    assert tokens.shape == (b, t, h)


def test_hvp_without_an_image_is_bert_and_the_image_changes_it():
    cfg = ModelConfig(fusion="hvp")
    model = build_model(cfg).eval()
    enc, pixels, boxes = batch(cfg, build_tokenizer(cfg))
    with torch.no_grad():
        plain = model.bert(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        text_only = model.text_states(
            enc.input_ids, enc.attention_mask, pixels, torch.zeros(2).bool(), boxes
        )
        fused = model.text_states(
            enc.input_ids, enc.attention_mask, pixels, torch.tensor([True, False]), boxes
        )
        attentions: list = []
        model.text_states(enc.input_ids, enc.attention_mask, pixels, torch.ones(2).bool(),
                          boxes, attentions=attentions)  # fmt: skip
    assert torch.allclose(text_only, plain.last_hidden_state, atol=1e-5)
    assert torch.allclose(fused[1], plain.last_hidden_state[1], atol=1e-5)  # its prefix masked
    assert not torch.allclose(fused[0], plain.last_hidden_state[0], atol=1e-3)
    # one attention map per layer over prefix + text; rows sum to 1
    assert len(attentions) == len(model.bert.encoder.layer)
    weights = attentions[0]
    prefix = weights.shape[-1] - enc.input_ids.shape[1]
    assert prefix == 4 * (1 + model.cfg.max_crops)  # the image and 3 crops, 2 x 2 tokens each
    assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-5)


def test_hvp_pretrains_with_a_falling_loss_and_fine_tunes_both_tasks(tmp_path, synthetic_shards):
    cfg = pretrain.TrainConfig(
        fusion="hvp",
        shards=str(synthetic_shards),
        out=str(tmp_path / "hvp"),
        metrics="",
        report="",
        live_dir="",
        plot="",
        steps=12,
        batch_size=8,
        lr=1e-3,
        warmup_steps=2,
        num_workers=0,
        shuffle_buffer=0,
        threads=1,
        device="cpu",
        log_every=2,
        ckpt_every=100,
        export_hf=False,
    )
    report = pretrain.train(cfg)
    first, last = report["first"], report["train"]
    assert set(first) >= {"itm", "cit", "coe", "cir"}
    assert last["loss"] < first["loss"], (first, last)
    model, mcfg, _ = load_pretrained(tmp_path / "hvp")
    assert mcfg.fusion == "hvp" and type(model).__name__ == "HVPModel"
    for task in ("mner", "mre"):
        d = SAMPLE / task
        ft = FinetuneConfig(
            task=task, train=str(d / "train.txt"), dev=str(d / "dev.txt"),
            test=str(d / "test.txt"), init=str(tmp_path / "hvp"), out=str(tmp_path / task),
            epochs=2, batch_size=8, lr_encoder=1e-3, lr_head=3e-3, patience=0, threads=1,
            device="cpu",
        )  # fmt: skip
        m = run_finetune(ft)
        assert m["encoder"]["fusion"] == "hvp" and 0 <= m["test"]["overall"]["f1"] <= 1
        assert len(m["history"]) == 2


def test_an_albef_checkpoint_records_no_fusion_key(tmp_path):
    """Fields added with the interface stay out of an ALBEF model's saved config (its bytes
    are what they were before the interface)."""
    cfg = ModelConfig()
    saved = cfg.to_dict()
    assert "fusion" not in saved and "max_crops" not in saved and "vision_arch" not in saved
    assert dataclasses.replace(cfg, fusion="hvp").to_dict()["fusion"] == "hvp"


def _sample_images(root, task: str):
    """An image for every sample of the bundled split files (noise, seeded)."""
    from PIL import Image

    from trainer import ie_data

    root.mkdir(parents=True, exist_ok=True)
    d = SAMPLE / task
    for split in ("train", "dev", "test"):
        path = d / f"{split}.txt"
        if task == "mner":
            samples = ie_data.read_ner(path)
        else:
            samples = ie_data.read_mnre(path, ie_data.load_rel2id(d / "rel2id.json"))
        for i, s in enumerate(samples):
            rng = torch.Generator().manual_seed(i)
            pixels = torch.randint(0, 256, (48, 64, 3), generator=rng, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / f"{s.img_id}.jpg")
    return root


@pytest.mark.parametrize("fusion", ["albef", "hvp"])
def test_object_crops_at_fine_tuning(tmp_path, fusion):
    """--crops N: the detector's top-N boxes of every image, cached, fused as crops."""
    import json

    from pipeline.models import save_tiny_detector

    detector = save_tiny_detector(tmp_path / "tiny.pt")
    images = _sample_images(tmp_path / "images", "mner")
    d = SAMPLE / "mner"
    ft = FinetuneConfig(
        task="mner", train=str(d / "train.txt"), dev=str(d / "dev.txt"), test=str(d / "test.txt"),
        init="tiny", fusion=fusion, images=str(images), crops=2, detector=str(detector),
        detector_preset="tiny", detector_imgsz=64, detector_conf=0.0, out=str(tmp_path / "run"),
        epochs=1, batch_size=8, patience=0, threads=1, device="cpu",
    )  # fmt: skip
    m = run_finetune(ft)
    assert m["text_only"]["samples"] == {"train": 0, "dev": 0, "test": 0}
    cached = json.loads((tmp_path / "run" / "boxes.json").read_text())
    boxes = cached["boxes"]
    assert len(boxes) == len(list(images.iterdir()))
    assert all(len(b) <= 2 and all(0 <= v <= 1 for box in b for v in box) for b in boxes.values())
    assert any(len(b) == 2 for b in boxes.values())  # conf 0: the random detector finds some


def test_albef_crops_add_tokens_that_change_the_states():
    cfg = ModelConfig(max_crops=2)
    model = build_model(cfg).eval()
    enc, pixels, boxes = batch(cfg, build_tokenizer(cfg), n_boxes=2)
    has = torch.ones(2).bool()
    with torch.no_grad():
        plain = model.text_states(enc.input_ids, enc.attention_mask, pixels, has)
        crops = model.text_states(enc.input_ids, enc.attention_mask, pixels, has, boxes)
        no_box = model.text_states(enc.input_ids, enc.attention_mask, pixels, has, boxes * 0)
    assert not torch.allclose(plain, crops, atol=1e-4)
    assert torch.allclose(plain, no_box, atol=1e-5)  # empty boxes are masked out


def _docs_example() -> str:
    """The worked example of docs/trainer.md ("Add your own fusion"), as the docs show it."""
    text = (REPO_ROOT / "docs" / "trainer.md").read_text(encoding="utf-8")
    section = text.split("### Add your own fusion", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_fusion_pretrains_reloads_and_fine_tunes(tmp_path, monkeypatch,
                                                                synthetic_shards):  # fmt: skip
    import sys

    (tmp_path / "my_fusion.py").write_text(_docs_example(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_fusion", raising=False)
    monkeypatch.setattr(registry, "FUSIONS", dict(registry.FUSIONS))  # registers into a copy
    cfg = pretrain.TrainConfig(
        fusion="my_fusion:early", shards=str(synthetic_shards), out=str(tmp_path / "early"),
        metrics="", report="", live_dir="", plot="", steps=10, batch_size=8, lr=1e-3,
        warmup_steps=2, num_workers=0, shuffle_buffer=0, threads=1, device="cpu", log_every=2,
        ckpt_every=100, export_hf=False,
    )  # fmt: skip
    report = pretrain.train(cfg)
    assert set(report["first"]) >= {"itm", "cit", "coe", "cir"}
    assert report["train"]["loss"] < report["first"]["loss"]
    model, mcfg, _ = load_pretrained(tmp_path / "early")
    assert mcfg.fusion == "my_fusion:early" and type(model).__name__ == "EarlyFusion"
    d = SAMPLE / "mner"
    ft = FinetuneConfig(
        task="mner", train=str(d / "train.txt"), dev=str(d / "dev.txt"), test=str(d / "test.txt"),
        init=str(tmp_path / "early"), images=str(_sample_images(tmp_path / "img", "mner")),
        out=str(tmp_path / "mner"), epochs=1, batch_size=8, patience=0, threads=1, device="cpu",
    )  # fmt: skip
    m = run_finetune(ft)
    assert m["encoder"]["fusion"] == "my_fusion:early" and m["text_only"]["samples"]["test"] == 0


def test_an_unknown_fusion_says_what_exists():
    from pmu.errors import InputError
    from trainer.fusion import fusion_spec

    with pytest.raises(InputError, match="one of: albef, hvp, or module:name"):
        fusion_spec("nope")
    with pytest.raises(InputError, match="cannot import no_such_module"):
        fusion_spec("no_such_module:early")
